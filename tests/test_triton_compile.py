"""The Triton HSTU kernels compile for a GPU target on a machine without one (scripts/compile_triton_kernels.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: its own library binds to it

from benchmark_scripts import load_script  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_triton_kernels.py"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def test_launches_are_recorded_with_every_input(script):
    launches = script.record_launches(16, 32, torch.bfloat16, default_positions=False)
    assert [launch.kernel for launch in launches] == list(script.KERNELS)
    forward = launches[0]
    assert forward.kwargs["HAS_FLAGS"] and forward.kwargs["USE_POS"] and forward.kwargs["USE_TIME"]
    assert forward.args[0].dtype == torch.bfloat16 and forward.args[0].shape[-1] == 16


def test_signature_types_every_argument(script):
    from lumrec.modules.ops.triton import hstu_op

    (launch,) = [x for x in script.record_launches(16, 16, torch.float32, True) if x.kernel == "hstu_forward"]
    kernel = getattr(hstu_op._kernels(False), launch.kernel)
    signature, constexprs = script._signature(kernel, launch, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_DQK": 16, "BLOCK_DV": 16})
    assert list(signature) == kernel.arg_names
    assert signature["Q"] == "*fp32" and signature["Flags"] == "*i8" and signature["stride_qt"] == "i32"
    assert signature["scale"] == "fp32" and constexprs["BLOCK_M"] == 64 and constexprs["PRECISION"] == "ieee"


def test_kernels_compile_for_sm90(script, capsys):
    """Forward, dk/dv and dq at a CUDA launch's tiles, bf16 head dim 64, compiled by the pinned Triton for sm_90."""
    assert script.main(["--arch", "90", "--dtypes", "bf16", "--dims", "64"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("hstu_")]
    assert len(lines) == 6 and all(line.endswith("ok") for line in lines), out
    assert "all compiled" in out
