"""Compile the Triton HSTU attention kernels for a GPU architecture on a machine without one.

Triton compiles ahead of time for any target it knows (`ptxas` ships in its wheel), so what the
GPU machine would compile at the first launch is checked here: every kernel (forward, dk/dv, dq)
at the tile sizes, warps and stages a CUDA launch uses, for each dtype and head dims given, with
every bias and query-token input switched on. A kernel that does not compile for the target, or
needs more shared memory per program than the target has, fails here, not in device time.

How the launch arguments are found: the operators run once in Triton's interpreter on tiny CPU
tensors with the kernels' launches recorded (not run); each recorded launch is then compiled with
the tile sizes of a CUDA launch (``hstu_op._tiles(..., interpret=False)``).

    .venv/bin/python scripts/compile_triton_kernels.py                      # sm_90 (H100 / H200), fp32 + bf16, dims 64 and 256
    .venv/bin/python scripts/compile_triton_kernels.py --arch 80 --dtypes bf16 --dims 128 48x80

Prints one line per compiled kernel (shared memory per program against the target's limit) and
exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # the recording run is interpreted; set before triton is imported

import torch  # noqa: E402

from lumrec.modules.ops.triton import hstu_op  # noqa: E402

KERNELS = ("hstu_forward", "hstu_backward_dkdv", "hstu_backward_dq")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Shared memory one program may use, by compute capability (CUDA's per-block opt-in maximum).
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}
_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
                  torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.bool: "*i1"}


@dataclass
class Launch:
    """One recorded kernel launch: the kernel's name and the arguments it was given."""

    kernel: str
    args: tuple
    kwargs: dict[str, Any]


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, name: str, launches: list[Launch]) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.launches.append(Launch(self.name, args, kwargs))


def record_launches(dqk: int, dv: int, dtype: torch.dtype, default_positions: bool) -> list[Launch]:
    """The forward's and backward's kernel launches for a tiny batch with every optional input on."""
    module = hstu_op._kernels(True)
    launches: list[Launch] = []
    saved = {name: getattr(module, name) for name in KERNELS}
    tokens, heads, buckets, max_len = 5, 2, 4, 8
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(tokens, heads, dqk, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(tokens, heads, dv, generator=gen).to(dtype)
    inputs = (
        torch.tensor([0, 3, tokens]),                               # segment offsets
        torch.tensor([0, 0, 1, 0, 1], dtype=torch.int8),           # query-token flags
        None if default_positions else torch.arange(tokens),       # positions
        torch.arange(tokens) * 10,                                  # times
        torch.full((tokens,), 100),                                 # query times
        torch.zeros(heads, 2 * max_len - 1),                        # position table
        torch.zeros(heads, buckets + 1),                            # time table
        [0, 1, 2, 4, 8, 2**62],                                     # time-bucket thresholds and sentinel
        max_len, 0.5, 1.0, True, 1.0, default_positions, True,
    )
    try:
        for name in KERNELS:
            setattr(module, name, _Recorder(name, launches))
        torch.ops.lumrec.hstu_attention(q, k, v, *inputs)
        torch.ops.lumrec.hstu_attention_backward(torch.ones(tokens, heads, dv).to(dtype), q, k, v, *inputs)
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return launches


def _signature(kernel: Any, launch: Launch, tiles: dict[str, int]) -> tuple[dict[str, str], dict[str, Any]]:
    """Triton's signature (name -> type) and constexprs of a recorded launch, with a CUDA launch's tiles."""
    values = dict(zip(kernel.arg_names, launch.args))
    values.update(launch.kwargs)
    values.update({name: tiles[name] for name in tiles if name in kernel.arg_names})
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel}: argument {param.name} = {value!r}: no Triton type for it")
    return signature, constexprs


def compile_launch(launch: Launch, dqk: int, dv: int, default_positions: bool, arch: int) -> dict[str, Any]:
    """Compile one recorded launch for `arch` at a CUDA launch's tiles; returns what it needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(hstu_op._kernels(False), launch.kernel)
    square = launch.kernel == "hstu_backward_dkdv" and default_positions
    tiles = hstu_op._tiles(dqk, dv, interpret=False, square=square)
    options = {"num_warps": tiles.pop("num_warps"), "num_stages": tiles.pop("num_stages")}
    signature, constexprs = _signature(kernel, launch, tiles)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options)
    return {"shared": int(compiled.metadata.shared), "seconds": time.perf_counter() - start, **tiles, **options}


def _dims(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '48x80' -> (48, 80): the q/k head dim and the v head dim."""
    parts = [int(p) for p in text.lower().split("x")]
    return (parts[0], parts[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 = H100/H200, 80 = A100")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--dims", nargs="+", type=_dims, default=[(64, 64), (256, 256)], help="head dims: 64, or 48x80 for dqk x dv")
    args = ap.parse_args(argv)
    import triton

    limit = SHARED_LIMIT.get(args.arch)
    print(f"Triton {triton.__version__}, target sm_{args.arch} (shared memory per program at most "
          f"{'unknown' if limit is None else f'{limit:,} B'})")
    print(f"{'kernel':<20} {'dtype':<5} {'dqk x dv':>9} {'positions':<9} {'tiles M x N':>11} {'warps':>5} "
          f"{'shared B':>9} {'s':>5}  result")
    failed = 0
    for dtype_name in args.dtypes:
        for dqk, dv in args.dims:
            for default_positions in (True, False):
                for launch in record_launches(dqk, dv, DTYPES[dtype_name], default_positions):
                    where = f"{launch.kernel:<20} {dtype_name:<5} {f'{dqk}x{dv}':>9} {'index' if default_positions else 'given':<9}"
                    try:
                        got = compile_launch(launch, dqk, dv, default_positions, args.arch)
                    except Exception as err:  # noqa: BLE001 - every failure is reported, then the exit code says so
                        failed += 1
                        print(f"{where} FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                        continue
                    fits = limit is None or got["shared"] <= limit
                    failed += not fits
                    print(f"{where} {got['BLOCK_M']:>5} x {got['BLOCK_N']:<3} {got['num_warps']:>5} {got['shared']:>9,} "
                          f"{got['seconds']:>5.1f}  {'ok' if fits else 'TOO MUCH SHARED MEMORY'}")
    print("all compiled" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
