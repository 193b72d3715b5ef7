"""Benchmark: HSTU attention forward + backward, Triton kernel vs the PyTorch path vs fused softmax (SDPA).

At the shapes of the GPU anchors (``../shared/device/README.md``), each row times, side by side in
one run (the paths alternate within every repeat), forward + backward of:

- triton: ``triton_hstu_attention`` (``Kernel.TRITON``), jagged, no `L x L` tensor;
- pytorch: ``jagged_causal_attention(kind="hstu")`` under ``Kernel.PYTORCH`` (length buckets, padded);
- sdpa: PyTorch's fused causal softmax attention (``scaled_dot_product_attention``) on the padded
  `[B, H, Lmax, D]` equivalent: the speed target of the issue, not the same function.

The attention layout is built once per row, outside the timed region, as a stack of layers shares
it. `--bias on` adds the relative position and time bias (HSTU's rab) to both HSTU paths. Reported:
median ms of `--repeats` runs after `--warmup` runs, peak CUDA memory above the inputs, ratios to
sdpa and pytorch, and the largest output difference triton vs pytorch. Prints one table, then one
JSON line of the figures (also merged into ``--out``, ``benchmarks/results/hstu_attention.json``
by default, under the device's name).

CUDA only; on CPU it refuses unless `--interpret-smoke`: tiny shapes in Triton's interpreter, one
repeat (checks that the script runs, for tests; its times mean nothing).

    python3 -P benchmarks/hstu_attention.py                     # on the GPU machine (see docs/kernels.md)
    .venv/bin/python benchmarks/hstu_attention.py --interpret-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lumrec.modules.layers.relative_bias import RelativeAttentionBias
from lumrec.modules.ops import (
    Kernel,
    build_attention_layout,
    jagged_causal_attention,
    jagged_to_padded_dense,
    lengths_to_offsets,
    use_kernel,
)
from lumrec.modules.ops.triton.hstu_attention import triton_hstu_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import merge_row  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "hstu_attention.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: `rows` sequences of `max_len` tokens (or random lengths up to it when jagged)."""

    name: str
    rows: int
    max_len: int
    heads: int
    head_dim: int
    dtype: str
    jagged: bool = False


# The anchors' shapes: d_model 256 as 4 heads of 64 for the long rows; the ML-1M-like jagged batch twice.
SHAPES = {
    "8x8192": Shape("8x8192", 8, 8192, 4, 64, "bf16"),
    "32x2048": Shape("32x2048", 32, 2048, 4, 64, "bf16"),
    "128x200_bf16": Shape("128x200_bf16", 128, 200, 1, 64, "bf16", jagged=True),
    "128x200_fp32": Shape("128x200_fp32", 128, 200, 2, 32, "fp32", jagged=True),
}
SMOKE_SHAPES = {"smoke": Shape("smoke", 4, 20, 2, 8, "fp32", jagged=True)}


def make_inputs(shape: Shape, bias: bool, device: str, seed: int = 0) -> dict:
    """Random q, k, v, offsets, timestamps and (when `bias`) a relative bias, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    if shape.jagged:
        lengths = torch.randint(1, shape.max_len + 1, (shape.rows,), generator=gen)
    else:
        lengths = torch.full((shape.rows,), shape.max_len)
    offsets = lengths_to_offsets(lengths)
    total = int(offsets[-1])
    dtype = DTYPES[shape.dtype]

    def tensor() -> torch.Tensor:
        x = torch.randn(total, shape.heads, shape.head_dim, generator=gen) * 0.5
        return x.to(device=device, dtype=dtype).requires_grad_()

    timestamps = torch.cumsum(torch.randint(0, 3600, (total,), generator=gen), 0)
    rab = None
    if bias:
        rab = RelativeAttentionBias(max_len=shape.max_len, num_time_buckets=64, num_heads=1).to(device)
    layout = build_attention_layout(offsets.to(device), timestamps=timestamps.to(device) if bias else None)
    return dict(q=tensor(), k=tensor(), v=tensor(), offsets=offsets.to(device), lengths=lengths, layout=layout,
                rab=rab, total=total, normaliser=float(shape.max_len))


def _sdpa_inputs(inputs: dict, shape: Shape) -> tuple[torch.Tensor, ...]:
    """The padded `[B, H, Lmax, D]` equivalent of the jagged q, k, v (leaf tensors of their own)."""
    max_len = int(inputs["lengths"].max())
    padded = []
    for name in ("q", "k", "v"):
        x = inputs[name].detach().reshape(inputs["total"], -1)
        dense = jagged_to_padded_dense(x, inputs["offsets"], max_len)
        dense = dense.view(shape.rows, max_len, shape.heads, shape.head_dim).transpose(1, 2).contiguous()
        padded.append(dense.requires_grad_())
    return tuple(padded)


def paths(inputs: dict, shape: Shape, interpret: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """One closure per path: forward + backward; returns the forward output."""
    q, k, v, layout = inputs["q"], inputs["k"], inputs["v"], inputs["layout"]
    grad = torch.randn_like(v)
    hstu = dict(layout=layout, relative_bias=inputs["rab"], normaliser=inputs["normaliser"])

    def triton_path() -> torch.Tensor:
        out = triton_hstu_attention(q, k, v, **hstu, interpret=interpret)
        out.backward(grad)
        return out

    def pytorch_path() -> torch.Tensor:
        with use_kernel(Kernel.PYTORCH):
            out = jagged_causal_attention(q, k, v, kind="hstu", **hstu)
        out.backward(grad)
        return out

    qp, kp, vp = _sdpa_inputs(inputs, shape)
    grad_padded = torch.randn_like(vp)

    def sdpa_path() -> torch.Tensor:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        out.backward(grad_padded)
        return out

    return {"triton": triton_path, "pytorch": pytorch_path, "sdpa": sdpa_path}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], torch.Tensor], device: str) -> float:
    """Wall time of one call in ms (CUDA events on GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000.0


def _peak_gib(fn: Callable[[], torch.Tensor], device: str) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it, GiB."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def _clear_grads(inputs: dict) -> None:
    for name in ("q", "k", "v"):
        inputs[name].grad = None
    if inputs["rab"] is not None:
        inputs["rab"].zero_grad(set_to_none=True)


def run_row(shape: Shape, bias: bool, device: str, warmup: int, repeats: int, interpret: bool) -> dict:
    """Time the three paths side by side at `shape`; medians, peaks, ratios and the triton-pytorch difference."""
    inputs = make_inputs(shape, bias, device)
    fns = paths(inputs, shape, interpret)
    outputs = {}
    for name, fn in fns.items():  # warm-up, Triton compilation included
        for _ in range(warmup):
            outputs[name] = fn().detach()
            _clear_grads(inputs)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_ms(fn, device))
            _clear_grads(inputs)
    peaks = {name: _peak_gib(fn, device) for name, fn in fns.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    diff = (outputs["triton"].float() - outputs["pytorch"].float()).abs().max().item()
    return {
        "shape": shape.name, "rows": shape.rows, "max_len": shape.max_len, "tokens": inputs["total"],
        "heads": shape.heads, "head_dim": shape.head_dim, "dtype": shape.dtype, "bias": bias,
        "ms": {name: round(value, 4) for name, value in medians.items()},
        "peak_gib": {name: (round(value, 4) if value is not None else None) for name, value in peaks.items()},
        "triton_vs_sdpa": round(medians["triton"] / medians["sdpa"], 3),
        "triton_vs_pytorch": round(medians["triton"] / medians["pytorch"], 3),
        "mtokens_per_s_triton": round(inputs["total"] / medians["triton"] / 1000.0, 3),
        "max_abs_diff_vs_pytorch": diff,
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'shape':<14}{'bias':>5}{'tokens':>8}{'H x d':>8}{'dtype':>6}{'triton ms':>11}{'pytorch ms':>12}"
            f"{'sdpa ms':>9}{'tr/sdpa':>9}{'tr/pt':>7}{'peak GiB tr/pt/sdpa':>22}{'max diff':>10}")
    print(head)
    for r in rows:
        dims = f"{r['heads']}x{r['head_dim']}"
        peaks = "/".join("-" if r["peak_gib"][n] is None else f"{r['peak_gib'][n]:.2f}" for n in ("triton", "pytorch", "sdpa"))
        print(f"{r['shape']:<14}{'on' if r['bias'] else 'off':>5}{r['tokens']:>8}{dims:>8}"
              f"{r['dtype']:>6}{r['ms']['triton']:>11.3f}{r['ms']['pytorch']:>12.3f}{r['ms']['sdpa']:>9.3f}"
              f"{r['triton_vs_sdpa']:>9.2f}{r['triton_vs_pytorch']:>7.2f}{peaks:>22}{r['max_abs_diff_vs_pytorch']:>10.2e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--bias", choices=["off", "on", "both"], default="both", help="relative position/time bias")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="CPU: tiny shapes in Triton's interpreter, one repeat (checks the script runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    smoke = args.interpret_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks/hstu_attention.py: needs a CUDA GPU (it times Triton kernels); "
            "on CPU run it with --interpret-smoke to check that it runs (tiny shapes, times meaningless)"
        )
    device = "cpu" if smoke else "cuda"
    shapes = list(SMOKE_SHAPES.values()) if smoke else [SHAPES[name] for name in args.shapes]
    biases = {"off": [False], "on": [True], "both": [False, True]}[args.bias]
    warmup, repeats = (1, 1) if smoke else (args.warmup, args.repeats)
    rows = [run_row(shape, bias, device, warmup, repeats, smoke) for shape in shapes for bias in biases]
    print_table(rows)
    result = {
        "benchmark": "hstu_attention", "device": "interpreter (cpu)" if smoke else torch.cuda.get_device_name(),
        "torch": torch.__version__, "python": platform.python_version(), "warmup": warmup, "repeats": repeats,
        "rows": rows,
    }
    print(json.dumps(result))
    merge_row(args.out, "interpret_smoke" if smoke else result["device"], result)
    return result


if __name__ == "__main__":
    main()
