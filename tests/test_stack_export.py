"""The HSTU stack under Kernel.TRITON compiles (torch.compile, fullgraph) and exports (torch.export, dynamic tokens).

Nothing in its forward reads a tensor value on the host: the layout is ``TritonSegments``
(built on the device) and the kernels are the custom operators ``lumrec::hstu_attention`` and
its backward. Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported), so shapes stay tiny; the ``gpu``-marked tests run compiled on CUDA.
"""

from __future__ import annotations

import io
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its own library binds to it

import pytest  # noqa: E402
from torch.export import Dim  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from lumrec.modules.layers.hstu import HSTUConfig, HSTULayer, HSTUStack  # noqa: E402
from lumrec.modules.layers.relative_bias import RelativeAttentionBias  # noqa: E402
from lumrec.modules.ops import (  # noqa: E402
    Kernel,
    build_attention_layout,
    jagged_causal_attention_reference,
    lengths_to_offsets,
    use_kernel,
)
from lumrec.modules.ops.triton import build_triton_segments, triton_hstu_attention  # noqa: E402
from lumrec.modules.ops.triton import hstu_attention as hstu_attention_mod  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)
MAX_LEN = 12
# Ops that read a tensor's values on the host (or size their output by them): none may run in the forward.
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique_consecutive", "_unique2", "unique_dim",
                 "is_nonzero", "equal", "masked_select", "repeat_interleave"}


def _stack(seed: int = 0, device: str = DEVICE) -> HSTUStack:
    torch.manual_seed(seed)
    stack = HSTUStack(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=MAX_LEN, num_time_buckets=8), 2)
    with torch.no_grad():  # larger bias tables than the init, so that the bias visibly matters
        for layer in stack.layers:
            for table in (layer.relative_bias.position_weight, layer.relative_bias.time_weight):
                table.normal_()
    return stack.to(device)


def _batch(seed: int, rows: int, device: str = DEVICE, packed: bool = True) -> tuple[tuple, dict]:
    """Random jagged batch (an empty row included), packed segments, query tokens, timestamps: (args, kwargs)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_LEN + 1, (rows,), generator=gen)
    lengths[seed % rows] = 0
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    pieces = [torch.cumsum((torch.rand(n, generator=gen) < 0.2).long(), 0) for n in lengths.tolist()]
    tokens = dict(
        segment_ids=torch.cat(pieces) if packed else None,
        timestamps=torch.cumsum(torch.randint(0, 300, (total,), generator=gen), 0),
        query_flags=torch.rand(total, generator=gen) < 0.25,
    )
    x = torch.randn(total, 8, generator=gen)
    on = {name: t.to(device) for name, t in tokens.items() if t is not None}
    return (x.to(device), offsets.to(device)), on


def _dynamic_shapes(kwargs: dict) -> tuple[tuple, dict]:
    tokens, rows = Dim("tokens", min=2, max=4096), Dim("rows", min=1, max=1024)
    return ({0: tokens}, {0: rows + 1}), {name: {0: tokens} for name in kwargs}


def _export(stack: HSTUStack, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    args_shapes, kwargs_shapes = _dynamic_shapes(kwargs)
    with use_kernel(Kernel.TRITON):
        shapes = {"x": args_shapes[0], "offsets": args_shapes[1], **kwargs_shapes}
        return torch.export.export(stack, args, kwargs=kwargs, dynamic_shapes=shapes, strict=False)


def _saved_and_loaded(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program after torch.export.save / load (the custom operators are registered by importing lumrec)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


class _HostSyncRecorder(TorchDispatchMode):
    """Records the ops that read tensor values on the host (custom operators' insides are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _eager(stack: HSTUStack, args: tuple, kwargs: dict) -> torch.Tensor:
    with use_kernel(Kernel.TRITON):
        return stack(*args, **kwargs)


def test_segments_match_the_host_layout():
    """Device-built segments: the host layout's segments (then empty ones) and its default positions."""
    for seed, packed in ((1, True), (2, False)):
        (x, offsets), tokens = _batch(seed, rows=5, packed=packed)
        segments = build_triton_segments(offsets, num_tokens=x.shape[0], max_len=MAX_LEN, **tokens)
        layout = build_attention_layout(offsets, **tokens)
        lengths = torch.diff(segments.seg_offsets)
        torch.testing.assert_close(lengths[lengths > 0], layout.segment_lengths)
        assert int(segments.seg_offsets[-1]) == x.shape[0]
        starts = torch.repeat_interleave(torch.cumsum(layout.segment_lengths, 0) - layout.segment_lengths,
                                         layout.segment_lengths)
        torch.testing.assert_close(segments.positions, torch.arange(x.shape[0], device=DEVICE) - starts)


def test_segments_longer_than_the_bound_stay_exact():
    """The bound only sizes the grid: segments of 40 tokens under max_len=2 (one program per segment and
    head, looping over blocks) equal the reference, gradients too."""
    gen = torch.Generator().manual_seed(14)
    offsets = lengths_to_offsets(torch.tensor([40, 3, 0, 21])).to(DEVICE)
    segment_ids = torch.cat([torch.zeros(35), torch.ones(5), torch.zeros(24)]).long().to(DEVICE)
    timestamps = torch.cumsum(torch.randint(0, 300, (64,), generator=gen), 0).to(DEVICE)
    tokens = dict(segment_ids=segment_ids, timestamps=timestamps)
    rab = RelativeAttentionBias(max_len=8, num_time_buckets=8).to(DEVICE)
    q, k, v = (torch.randn(64, 1, 4, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    segments = build_triton_segments(offsets, num_tokens=64, max_len=2, **tokens)
    out = triton_hstu_attention(q, k, v, layout=segments, relative_bias=rab, normaliser="length")
    ref = jagged_causal_attention_reference(q, k, v, offsets, kind="hstu", relative_bias=rab, normaliser="length",
                                            **tokens)
    torch.testing.assert_close(out, ref, **TOL)
    inputs = [q, k, v, rab.position_weight, rab.time_weight]
    for g, w in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(g, w, **TOL)


def test_forward_reads_nothing_on_the_host():
    """Under TRITON the stack's forward and backward run no op that reads tensor values on the host."""
    stack = _stack()
    args, kwargs = _batch(3, rows=3)
    args = (args[0].requires_grad_(), args[1])
    recorder = _HostSyncRecorder()
    with use_kernel(Kernel.TRITON), recorder:
        stack(*args, **kwargs).sum().backward()
    assert recorder.seen == []
    with use_kernel(Kernel.PYTORCH), _HostSyncRecorder() as bucketed:  # the detector does see the bucketed path's reads
        stack(*args, **kwargs)
    assert bucketed.seen


def test_export_with_dynamic_tokens_equals_eager():
    """torch.export (non-strict, dynamic tokens and rows): one custom-op call per layer, no data-dependent
    guard or host read in the graph; saved and loaded, it equals eager on other random batches."""
    stack = _stack().eval()
    args, kwargs = _batch(4, rows=4)
    program = _export(stack, args, kwargs)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("lumrec.hstu_attention.default") == len(stack.layers)
    assert not [t for t in targets if any(f"aten.{op}." in t for op in HOST_SYNC_OPS)]
    exported = _saved_and_loaded(program).module()
    for seed, rows in ((5, 3), (6, 7), (7, 5)):
        args, kwargs = _batch(seed, rows)
        torch.testing.assert_close(exported(*args, **kwargs), _eager(stack, args, kwargs), **TOL)


def test_export_of_a_single_layer_without_packing():
    """HSTULayer alone (segments built inside its forward): rows are the segments, offsets dynamic."""
    torch.manual_seed(1)
    layer = HSTULayer(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=MAX_LEN, normaliser="length"))
    layer = layer.to(DEVICE).eval()
    (x, offsets), kwargs = _batch(8, rows=3, packed=False)
    tokens, rows = Dim("tokens", min=2, max=4096), Dim("rows", min=1, max=1024)
    with use_kernel(Kernel.TRITON):
        program = torch.export.export(
            layer, (x, offsets), kwargs=kwargs, strict=False,
            dynamic_shapes={"x": {0: tokens}, "offsets": {0: rows + 1}, **{name: {0: tokens} for name in kwargs}},
        )
        (x, offsets), kwargs = _batch(9, rows=6, packed=False)
        torch.testing.assert_close(program.module()(x, offsets, **kwargs), layer(x, offsets, **kwargs), **TOL)


def test_export_with_the_threshold_cache_cold(monkeypatch):
    """The time-bucket thresholds are computed with real tensors even when first needed while tracing."""
    monkeypatch.setattr(hstu_attention_mod, "_threshold_cache", {})
    stack = _stack(seed=2).eval()
    args, kwargs = _batch(10, rows=3)
    program = _saved_and_loaded(_export(stack, args, kwargs))
    torch.testing.assert_close(program.module()(*args, **kwargs), _eager(stack, args, kwargs), **TOL)


def test_compile_fullgraph_equals_eager_with_gradients():
    """torch.compile(fullgraph=True, aot_eager): no graph break; outputs and every gradient equal eager;
    a batch of another size runs the same dynamic graph (forward only: the interpreter's backward is slow)."""
    stack = _stack(seed=3)
    compiled = torch.compile(stack, fullgraph=True, backend="aot_eager", dynamic=True)
    args, kwargs = _batch(11, rows=3)
    x = args[0].requires_grad_()
    params = [x, *stack.parameters()]
    with use_kernel(Kernel.TRITON):
        got = compiled(x, args[1], **kwargs)
        got_grads = torch.autograd.grad(got.square().sum(), params)
    want = _eager(stack, (x, args[1]), kwargs)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)
    args, kwargs = _batch(12, rows=6)
    with use_kernel(Kernel.TRITON), torch.no_grad():
        torch.testing.assert_close(compiled(*args, **kwargs), stack(*args, **kwargs), **TOL)


def test_other_kernels_unchanged_by_the_triton_layout():
    """Under PYTORCH the stack still builds the bucketed layout (its numbers are the ones it always had)."""
    stack = _stack(seed=4)
    args, kwargs = _batch(13, rows=4, device="cpu")
    stack = stack.cpu()
    with use_kernel(Kernel.PYTORCH):
        want = stack(*args, **kwargs)
    torch.testing.assert_close(_eager(stack, args, kwargs), want, **TOL)


@gpu
@needs_cuda
def test_no_host_sync_on_cuda():
    """CUDA's sync debug mode raises on any synchronising call in the stack's forward and backward."""
    stack = _stack(device="cuda")
    args, kwargs = _batch(20, rows=8, device="cuda")
    x = args[0].requires_grad_()
    _eager(stack, (x, args[1]), kwargs).sum().backward()  # compiles the kernels (their first launch may sync)
    torch.cuda.synchronize()
    args, kwargs = _batch(21, rows=8, device="cuda")
    x = args[0].requires_grad_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with use_kernel(Kernel.TRITON):
            stack(x, args[1], **kwargs).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_compiled_stack_on_cuda(dtype, monkeypatch):
    """torch.compile with inductor on CUDA (fullgraph, dynamic): equals eager, gradients too."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    stack = _stack(seed=5, device="cuda").to(dtype)
    compiled = torch.compile(stack, fullgraph=True, dynamic=True)

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        if dtype == torch.float32:  # the kernels are the same; inductor's fused norms and linears round differently
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # inductor fuses the bf16 layer norms and linears differently: bf16-sized, relative to the largest
            assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max()

    for seed, rows in ((22, 16), (23, 40)):
        args, kwargs = _batch(seed, rows, device="cuda")
        x = args[0].to(dtype).requires_grad_()
        params = [x, *stack.parameters()]
        with use_kernel(Kernel.TRITON):
            got = compiled(x, args[1], **kwargs)
            got_grads = torch.autograd.grad(got.float().square().sum(), params)
        want = _eager(stack, (x, args[1]), kwargs)
        want_grads = torch.autograd.grad(want.float().square().sum(), params)
        close(got, want)
        for g, w in zip(got_grads, want_grads):
            close(g, w)


@gpu
@needs_cuda
def test_export_on_cuda_equals_eager():
    stack = _stack(seed=6, device="cuda").eval()
    args, kwargs = _batch(24, rows=8, device="cuda")
    exported = _export(stack, args, kwargs).module()
    args, kwargs = _batch(25, rows=30, device="cuda")
    torch.testing.assert_close(exported(*args, **kwargs), _eager(stack, args, kwargs), **TOL)
