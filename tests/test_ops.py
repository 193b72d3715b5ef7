"""The kernel layer: every path of every op in lumrec.modules.ops against its reference (values and gradients)."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys

import pytest
import torch

import lumrec.modules.ops as ops
import lumrec.modules.ops.gather as gather_mod
import lumrec.modules.ops.kernel as kernel_mod
import lumrec.modules.ops.reference as reference_mod
from lumrec.modules.layers.hstu import HSTUConfig, HSTUStack
from lumrec.modules.ops import (
    Kernel,
    build_attention_layout,
    current_kernel,
    gather_columns,
    gather_columns_reference,
    jagged_causal_attention,
    jagged_causal_attention_reference,
    jagged_to_padded_dense,
    jagged_to_padded_dense_reference,
    lengths_to_offsets,
    lengths_to_offsets_reference,
    padded_dense_to_jagged,
    padded_dense_to_jagged_reference,
    set_kernel,
    use_kernel,
)
from lumrec.modules.layers.relative_bias import RelativeAttentionBias
from lumrec.modules.layers.transformer import TransformerConfig, TransformerStack

FAST = [Kernel.PYTORCH, Kernel.FBGEMM]
KINDS = [("softmax", None), ("hstu", 9.0), ("hstu", "length")]
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


def _lengths(gen: torch.Generator, max_len: int) -> torch.Tensor:
    """Random row lengths with the edge cases 0, 1 and max_len always present."""
    lengths = torch.cat([torch.tensor([0, 1, max_len]), torch.randint(0, max_len + 1, (5,), generator=gen)])
    return lengths[torch.randperm(lengths.numel(), generator=gen)]


def _packed_segment_ids(gen: torch.Generator, lengths: torch.Tensor) -> torch.Tensor:
    """Segment ids restarting at 0 in every row, cut at random places (about one in four tokens)."""
    pieces = []
    for n in lengths.tolist():
        cuts = torch.rand(n, generator=gen) < 0.25
        if n:
            cuts[0] = False
        pieces.append(torch.cumsum(cuts.long(), 0))
    return torch.cat(pieces)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 7) -> tuple[torch.Tensor, ...]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return torch.autograd.grad((out * weight).sum(), inputs)


def test_kernel_setting_and_its_context_manager():
    start = current_kernel()
    with use_kernel("reference") as inside:
        assert inside is Kernel.REFERENCE and current_kernel() is Kernel.REFERENCE
        with use_kernel(Kernel.PYTORCH):
            assert current_kernel() is Kernel.PYTORCH
        assert current_kernel() is Kernel.REFERENCE
    assert current_kernel() is start
    previous = set_kernel("PyTorch")
    try:
        assert previous is start and current_kernel() is Kernel.PYTORCH
    finally:
        set_kernel(previous)
    with pytest.raises(ValueError, match="unknown kernel 'cuda'.*reference.*pytorch.*fbgemm.*triton"):
        set_kernel("cuda")
    assert current_kernel() is start


def test_environment_variable_sets_the_starting_kernel():
    code = "import lumrec.modules.ops as o; print(o.current_kernel().value)"
    env = {**os.environ, "LUMREC_KERNEL": "pytorch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pytorch"
    env["LUMREC_KERNEL"] = "fast"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "LUMREC_KERNEL: unknown kernel 'fast'" in bad.stderr


def test_default_is_fbgemm():
    if os.environ.get("LUMREC_KERNEL"):
        pytest.skip("LUMREC_KERNEL is set")
    assert current_kernel() is Kernel.FBGEMM


@pytest.mark.parametrize("kernel", FAST)
@pytest.mark.parametrize("seed", range(3))
def test_lengths_to_offsets_matches_reference(kernel, seed):
    lengths = _lengths(torch.Generator().manual_seed(seed), 30)
    with use_kernel(kernel):
        assert torch.equal(lengths_to_offsets(lengths), lengths_to_offsets_reference(lengths))
        assert lengths_to_offsets(torch.zeros(0, dtype=torch.int64)).tolist() == [0]


@pytest.mark.parametrize("kernel", FAST + [Kernel.REFERENCE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("trailing", [(), (3,), (2, 3)])
@pytest.mark.parametrize("seed", range(2))
def test_jagged_dense_moves_match_reference(kernel, dtype, trailing, seed):
    """jagged -> padded (truncating rows longer than max_len) and back, values and gradients."""
    gen = torch.Generator().manual_seed(seed)
    lengths = _lengths(gen, 12)
    offsets = lengths_to_offsets_reference(lengths)
    total = int(offsets[-1])
    floating = dtype.is_floating_point
    values = (torch.randn(total, *trailing, generator=gen) * 10).to(dtype)
    if floating:
        values.requires_grad_()
    max_len = int(torch.randint(1, 16, (1,), generator=gen))
    with use_kernel(kernel):
        dense = jagged_to_padded_dense(values, offsets, max_len, padding_value=-1.0)
    ref = jagged_to_padded_dense_reference(values, offsets, max_len, padding_value=-1.0)
    assert dense.shape == (lengths.numel(), max_len, *trailing) and dense.dtype == dtype
    torch.testing.assert_close(dense, ref, **_tol(dtype))
    kept = lengths_to_offsets_reference(lengths.clamp(max=max_len))
    with use_kernel(kernel):
        back = padded_dense_to_jagged(dense, kept)
    torch.testing.assert_close(back, padded_dense_to_jagged_reference(ref, kept), **_tol(dtype))
    if floating:
        torch.testing.assert_close(_grads(back, [values])[0], _grads(padded_dense_to_jagged_reference(ref, kept), [values])[0])


@pytest.mark.parametrize("kernel", FAST + [Kernel.REFERENCE])
def test_jagged_dense_moves_on_empty_batches(kernel):
    with use_kernel(kernel):
        for lengths in ([], [0, 0]):
            offsets = lengths_to_offsets(torch.tensor(lengths, dtype=torch.int64))
            dense = jagged_to_padded_dense(torch.zeros(0, 3), offsets, 4)
            assert dense.shape == (len(lengths), 4, 3) and not dense.any()
            assert padded_dense_to_jagged(dense, offsets).shape == (0, 3)


@pytest.mark.parametrize("kernel", FAST + [Kernel.REFERENCE])
@pytest.mark.parametrize("seed", range(4))
def test_gather_columns_matches_indexing(kernel, seed):
    """The relative-bias gather with index_add_ backward equals plain advanced indexing."""
    g = torch.Generator().manual_seed(seed)
    heads, entries = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
    weight = torch.randn(heads, entries, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, entries, (3, 7, 7), generator=g)
    grad = torch.randn(heads, 3, 7, 7, generator=g, dtype=torch.float64)
    with use_kernel(kernel):
        fast = gather_columns(weight, index)
    ref = gather_columns_reference(weight, index)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(torch.autograd.grad(fast, weight, grad)[0], torch.autograd.grad(ref, weight, grad)[0])


def _attention_case(seed: int, dtype: torch.dtype, packed: bool, flags: bool, device: str = "cpu") -> dict:
    """Random jagged batch with optional packing and query flags, timestamps, request times and a relative bias."""
    gen = torch.Generator().manual_seed(seed)
    max_len = 20
    lengths = _lengths(gen, max_len)
    offsets = lengths_to_offsets_reference(lengths)
    total = int(offsets[-1])
    heads, dqk, dv = int(torch.randint(1, 4, (1,), generator=gen)), 4, 3
    timestamps = torch.cumsum(torch.randint(0, 5000, (total,), generator=gen), 0)
    rab = RelativeAttentionBias(max_len=max_len // 2, num_time_buckets=10, num_heads=heads).to(dtype)
    with torch.no_grad():  # larger than the init so that the bias visibly matters
        rab.position_weight.normal_(generator=gen)
        rab.time_weight.normal_(generator=gen)

    def tensor(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_()

    return dict(
        q=tensor(total, heads, dqk), k=tensor(total, heads, dqk), v=tensor(total, heads, dv),
        offsets=offsets.to(device),
        segment_ids=_packed_segment_ids(gen, lengths).to(device) if packed else None,
        query_flags=(torch.rand(total, generator=gen) < 0.3).to(device) if flags else None,
        timestamps=timestamps.to(device),
        query_timestamps=(timestamps + torch.randint(0, 9000, (total,), generator=gen)).to(device),
        rab=rab.to(device),
    )


def _check_attention_paths(case: dict, kind: str, normaliser, dtype: torch.dtype, kernels: list[Kernel]) -> None:
    """Each kernel's output and gradients (q, k, v, both bias tables) equal the reference's."""
    rab = case["rab"]
    inputs = [case["q"], case["k"], case["v"], rab.position_weight, rab.time_weight]
    tokens = dict(segment_ids=case["segment_ids"], query_flags=case["query_flags"], timestamps=case["timestamps"],
                  query_timestamps=case["query_timestamps"])
    args = dict(kind=kind, relative_bias=rab, normaliser=normaliser)
    ref = jagged_causal_attention_reference(case["q"], case["k"], case["v"], case["offsets"], **tokens, **args)
    ref_grads = _grads(ref, inputs)
    for kernel in kernels:
        with use_kernel(kernel):
            # Both entry points: tokens given directly, and a layout built once and reused (as the stacks do).
            direct = jagged_causal_attention(case["q"], case["k"], case["v"], case["offsets"], min_block=4, **tokens, **args)
            layout = build_attention_layout(case["offsets"], min_block=2, bucket_ratio=1.5, **tokens)
            reused = jagged_causal_attention(case["q"], case["k"], case["v"], layout=layout, **args)
            for out in (direct, reused):
                torch.testing.assert_close(out, ref, **_tol(dtype), msg=lambda m, k=kernel: f"{k}: {m}")
                for name, got, want in zip(["q", "k", "v", "pos_table", "time_table"], _grads(out, inputs), ref_grads):
                    torch.testing.assert_close(got, want, **_tol(dtype), msg=lambda m, n=name, k=kernel: f"{k} grad {n}: {m}")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("flags", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_attention_paths_match_reference(seed, packed, flags, dtype, kind, normaliser):
    case = _attention_case(seed, dtype, packed, flags)
    _check_attention_paths(case, kind, normaliser, dtype, FAST + [Kernel.REFERENCE])


@pytest.mark.parametrize("kernel", [Kernel.PYTORCH, Kernel.REFERENCE])
def test_stacks_route_through_the_kernel_setting(kernel):
    """HSTU and transformer stacks give the default path's outputs and gradients under every kernel."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 7, 7, 12])
    segment_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    timestamps = torch.cumsum(torch.randint(0, 500, (12,), generator=gen), 0)
    torch.manual_seed(0)
    stacks = [
        (HSTUStack(HSTUConfig(d_model=8, num_heads=2, dqk=4, dv=4, max_len=16), 2).double(), dict(timestamps=timestamps)),
        (TransformerStack(TransformerConfig(d_model=8, num_heads=2, ffn_dim=16, max_len=16), 2).double(), {}),
    ]
    for stack, extra in stacks:
        x = torch.randn(12, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        default = stack(x, offsets, segment_ids=segment_ids, **extra)
        with use_kernel(kernel):
            other = stack(x, offsets, segment_ids=segment_ids, **extra)
        torch.testing.assert_close(other, default, rtol=1e-10, atol=1e-10)
        params = [x, *stack.parameters()]
        for got, want in zip(_grads(other, params), _grads(default, params)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind,normaliser", KINDS)
def test_attention_paths_match_reference_on_cuda(kind, normaliser):
    """The same comparison on CUDA tensors: fbgemm's CUDA kernels where the build has them, else the PyTorch paths."""
    case = _attention_case(0, torch.float32, packed=True, flags=True, device="cuda")
    _check_attention_paths(case, kind, normaliser, torch.float32, FAST + [Kernel.REFERENCE])


def test_docstring_examples_run():
    for module in (ops, kernel_mod, reference_mod, gather_mod):
        result = doctest.testmod(module, raise_on_error=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__
