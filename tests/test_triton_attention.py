"""The Triton HSTU attention kernels (Kernel.TRITON) against the padded reference: outputs and gradients.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes stay tiny; the ``gpu``-marked tests run the same comparisons compiled, larger.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its own library binds to it

import pytest  # noqa: E402

import lumrec.modules.ops.attention as attention_mod  # noqa: E402
from benchmark_scripts import load_benchmark  # noqa: E402
from lumrec.modules.layers.hstu import HSTUConfig, HSTUStack  # noqa: E402
from lumrec.modules.layers.relative_bias import RelativeAttentionBias  # noqa: E402
from lumrec.modules.ops import (  # noqa: E402
    Kernel,
    build_attention_layout,
    jagged_causal_attention,
    jagged_causal_attention_reference,
    lengths_to_offsets,
    use_kernel,
)
from lumrec.modules.ops.triton.hstu_attention import triton_hstu_attention  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(
    seed: int,
    *,
    heads: int = 2,
    dqk: int = 8,
    dv: int = 6,
    max_len: int = 20,
    rows: int = 3,
    packed: bool = True,
    flags: bool = True,
    use_pos: bool = True,
    use_time: bool = True,
    query_times: bool = True,
    positions: bool = False,
    table_heads: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str = DEVICE,
) -> dict:
    """Random jagged batch (rows of length 0, 1 and max_len always present), its per-token inputs and a bias."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.tensor([0, 1, max_len]), torch.randint(0, max_len + 1, (rows,), generator=gen)])
    lengths = lengths[torch.randperm(lengths.numel(), generator=gen)]
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    segment_ids = None
    if packed:  # ids restart at 0 in every row: the row boundary must split segments by itself
        pieces = []
        for n in lengths.tolist():
            cuts = torch.rand(n, generator=gen) < 0.2
            if n:
                cuts[0] = False
            pieces.append(torch.cumsum(cuts.long(), 0))
        segment_ids = torch.cat(pieces)
    timestamps = torch.cumsum(torch.randint(0, 5000, (total,), generator=gen), 0)
    rab = None
    if use_pos or use_time:
        rab = RelativeAttentionBias(max_len=max_len // 2, num_time_buckets=10, num_heads=table_heads,
                                    use_position_bias=use_pos, use_time_bias=use_time).to(dtype)
        with torch.no_grad():  # larger than the init so that the bias visibly matters
            for table in (rab.position_weight, rab.time_weight):
                if table is not None:
                    table.normal_(generator=gen)
        rab = rab.to(device)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()

    on = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return dict(
        q=tensor(total, heads, dqk), k=tensor(total, heads, dqk), v=tensor(total, heads, dv),
        offsets=offsets.to(device), rab=rab,
        tokens=dict(
            segment_ids=on(segment_ids),
            query_flags=on(torch.rand(total, generator=gen) < 0.3) if flags else None,
            positions=on(torch.randint(0, 3 * max_len, (total,), generator=gen)) if positions else None,
            timestamps=on(timestamps) if use_time else None,
            query_timestamps=on(timestamps + torch.randint(0, 9000, (total,), generator=gen))
            if use_time and query_times else None,
        ),
    )


def _inputs(case: dict) -> list[torch.Tensor]:
    """Everything that gets a gradient: q, k, v and the bias tables that are on."""
    tables = [] if case["rab"] is None else [case["rab"].position_weight, case["rab"].time_weight]
    return [case["q"], case["k"], case["v"]] + [t for t in tables if t is not None]


def _compare(case: dict, normaliser, tol: dict, via_dispatch: bool = False, against: str = "reference") -> torch.Tensor:
    """Triton output and gradients (q, k, v, tables) equal the reference's (or the PyTorch path's) within `tol`."""
    args = dict(relative_bias=case["rab"], normaliser=normaliser)
    q, k, v, offsets = case["q"], case["k"], case["v"], case["offsets"]
    if via_dispatch:
        layout = build_attention_layout(offsets, **case["tokens"])
        with use_kernel(Kernel.TRITON):
            out = jagged_causal_attention(q, k, v, kind="hstu", layout=layout, **args)
    else:
        out = triton_hstu_attention(q, k, v, offsets, **case["tokens"], **args)
    if against == "reference":
        ref = jagged_causal_attention_reference(q, k, v, offsets, kind="hstu", **case["tokens"], **args)
    else:  # the PyTorch path (itself tested against the reference): the reference's loops are slow at large shapes
        with use_kernel(Kernel.PYTORCH):
            ref = jagged_causal_attention(q, k, v, offsets, kind="hstu", **case["tokens"], **args)
    torch.testing.assert_close(out, ref, **tol)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype).to(out.device)
    inputs = _inputs(case)
    got = torch.autograd.grad((out * weight).sum(), inputs)
    want = torch.autograd.grad((ref * weight).sum(), inputs)
    for name, g, w in zip(["q", "k", "v", "table 0", "table 1"], got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    return out


FP32 = dict(rtol=1e-5, atol=1e-5)

# Each seed one combination, so that every feature is on and off somewhere without a full product.
CASES = [
    (dict(), "length"),                                                         # everything on, 2 heads
    (dict(packed=False, flags=False, heads=1, dqk=4, dv=4), 7.0),               # plain causal rows
    (dict(use_pos=False, query_times=False, table_heads=2), "length"),          # time bias only, per-head table
    (dict(use_time=False, dqk=16, dv=16, heads=1), 3.0),                        # position bias only, widest dims
    (dict(use_pos=False, use_time=False, dqk=5, dv=9), "length"),               # no bias, odd dims
    (dict(flags=False, table_heads=2, dqk=4, dv=12), 20.0),                     # per-head tables, no query tokens
    (dict(positions=True, heads=1), "length"),                                  # positions given (not the index)
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_reference(index):
    options, normaliser = CASES[index]
    out = _compare(_case(index, **options), normaliser, FP32)
    assert torch.isfinite(out).all()


def test_float64_matches_reference_tightly():
    _compare(_case(11, dtype=torch.float64, heads=1, rows=2), "length", dict(rtol=1e-10, atol=1e-10))


def test_dispatch_through_the_kernel_setting():
    """Kernel.TRITON routes HSTU attention to the kernel (layout reused) and softmax to the PyTorch path."""
    case = _case(21, rows=2)
    _compare(case, 5.0, FP32, via_dispatch=True)
    q, k, v, offsets = case["q"], case["k"], case["v"], case["offsets"]
    with use_kernel(Kernel.TRITON):
        out = jagged_causal_attention(q, k, v, offsets, kind="softmax", **case["tokens"], relative_bias=case["rab"])
    ref = jagged_causal_attention_reference(q, k, v, offsets, kind="softmax", **case["tokens"], relative_bias=case["rab"])
    torch.testing.assert_close(out, ref, **FP32)


def test_time_buckets_exact_at_bucket_edges():
    """Gaps at powers of the base, one either side, and epoch-sized gaps: the kernel's buckets are the module's."""
    edges = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 26, 27, 28, 80, 81, 82, 2**20 - 1, 2**20, 2**31 - 1, 2**31, 10**12]
    for base, buckets in ((2.0, 40), (3.0, 30), (1.5, 64)):
        # One row per gap: token 0 at time 0, token 1 at the gap; only the time bias differs between pairs.
        gaps = torch.tensor(edges, dtype=torch.int64)
        timestamps = torch.stack([torch.zeros_like(gaps), gaps], 1).flatten().to(DEVICE)
        offsets = lengths_to_offsets(torch.full((len(edges),), 2)).to(DEVICE)
        rab = RelativeAttentionBias(max_len=4, num_time_buckets=buckets, time_bucket_base=base, use_position_bias=False)
        with torch.no_grad():
            rab.time_weight.copy_(torch.arange(buckets + 1, dtype=torch.float32)[None])  # bias = bucket number
        rab = rab.to(DEVICE)
        q = torch.zeros(len(timestamps), 1, 4, device=DEVICE)
        v = torch.ones(len(timestamps), 1, 4, device=DEVICE)
        args = dict(timestamps=timestamps, relative_bias=rab, normaliser=1.0)
        out = triton_hstu_attention(q, q, v, offsets, **args)
        ref = jagged_causal_attention_reference(q, q, v, offsets, kind="hstu", **args)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m, b=base: f"base {b}: {m}")


def test_empty_batches_and_empty_rows():
    empty = torch.zeros(0, 2, 4, device=DEVICE)
    offsets = torch.tensor([0, 0, 0], device=DEVICE)
    assert triton_hstu_attention(empty, empty, empty, offsets, normaliser="length").shape == (0, 2, 4)
    case = _case(5, max_len=3, rows=4, dqk=4, dv=4)
    _compare(case, "length", FP32)


def test_hstu_stack_gives_the_pytorch_paths_numbers():
    """A 2-layer HSTU stack (bias on, packed rows, query tokens) under TRITON equals the PyTorch path, grads too."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 7, 7, 12])
    segment_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    timestamps = torch.cumsum(torch.randint(0, 500, (12,), generator=gen), 0)
    query_flags = torch.zeros(12, dtype=torch.bool)
    query_flags[[6, 11]] = True
    torch.manual_seed(0)
    stack = HSTUStack(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16), 2).to(DEVICE)
    x = torch.randn(12, 8, generator=gen).to(DEVICE).requires_grad_()
    offsets = offsets.to(DEVICE)
    tokens = dict(segment_ids=segment_ids.to(DEVICE), timestamps=timestamps.to(DEVICE), query_flags=query_flags.to(DEVICE))
    with use_kernel(Kernel.PYTORCH):
        want = stack(x, offsets, **tokens)
    with use_kernel(Kernel.TRITON):
        got = stack(x, offsets, **tokens)
    torch.testing.assert_close(got, want, **FP32)
    params = [x, *stack.parameters()]
    for g, w in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(g, w, **FP32)


def test_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(3, 1, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_hstu_attention(q, q, q, torch.tensor([0, 3]), normaliser=1.0)


def test_fused_softmax_path_matches_reference(monkeypatch):
    """Softmax through scaled_dot_product_attention (the path off CPU), forced here on CPU tensors."""
    monkeypatch.setattr(attention_mod, "_use_fused_softmax", lambda x: True)
    case = _case(31, dqk=4, dv=3, device="cpu")
    q, k, v, offsets = case["q"], case["k"], case["v"], case["offsets"]
    args = dict(kind="softmax", **case["tokens"], relative_bias=case["rab"])
    with use_kernel(Kernel.PYTORCH):
        out = jagged_causal_attention(q, k, v, offsets, min_block=4, **args)
    ref = jagged_causal_attention_reference(q, k, v, offsets, **args)
    torch.testing.assert_close(out, ref, **FP32)
    inputs = _inputs(case)
    for g, w in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(g, w, **FP32)


def test_benchmark_script_interpret_smoke(tmp_path):
    bench = load_benchmark("hstu_attention")
    out = tmp_path / "hstu_attention.json"
    result = bench.main(["--interpret-smoke", "--out", str(out)])
    saved = json.loads(out.read_text())["interpret_smoke"]
    assert saved == result and result["benchmark"] == "hstu_attention" and result["rows"]
    assert all(row["max_abs_diff_vs_pytorch"] < 1e-4 for row in result["rows"])


@gpu
@needs_cuda
@pytest.mark.parametrize("index", range(len(CASES)))
def test_matches_reference_on_cuda_fp32(index, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    options, normaliser = CASES[index]
    _compare(_case(100 + index, **options, device="cuda"), normaliser, dict(rtol=1e-4, atol=1e-5))
    large = _case(150 + index, **{**options, "max_len": 700, "rows": 12}, device="cuda")
    _compare(large, 64.0, dict(rtol=1e-4, atol=1e-5), against="pytorch")


@gpu
@needs_cuda
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 256), (48, 80)])
def test_bf16_close_to_fp32_on_cuda(dims, monkeypatch):
    """bf16 kernels against the fp32 PyTorch path on the same (bf16-rounded) inputs: bf16-sized differences."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    case = _case(200, heads=4, dqk=dims[0], dv=dims[1], max_len=1000, rows=6, dtype=torch.bfloat16, device="cuda")
    q, k, v = (case[n].detach().float().requires_grad_() for n in ("q", "k", "v"))
    args = dict(relative_bias=case["rab"], normaliser="length")
    out = triton_hstu_attention(case["q"], case["k"], case["v"], case["offsets"], **case["tokens"], **args)
    with use_kernel(Kernel.PYTORCH):
        ref = jagged_causal_attention(q, k, v, case["offsets"], kind="hstu", **case["tokens"], **args)
    assert (out.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    weight = torch.randn(out.shape, device="cuda")
    got = torch.autograd.grad((out.float() * weight).sum(), [case["q"], case["k"], case["v"]])
    want = torch.autograd.grad((ref * weight).sum(), [q, k, v])
    for g, w in zip(got, want):
        assert (g.float() - w).abs().max().item() <= 3e-2 * w.abs().max().item()
