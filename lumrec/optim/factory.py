"""One place that turns optimizer hyper-parameters into what each training path needs.

The split between devices:

* CUDA with a CUDA build of fbgemm-gpu: fbgemm's fused TBE kernel runs PARTIAL_ROWWISE_ADAM
  inside the backward pass, so the embedding tables need no optimizer object.
  `fused_params_for(cuda, ...)` returns torchrec `fused_params` (pass them to
  `EmbeddingBagCollectionSharder(fused_params=...)`, FUSED kernel).
* CPU, and CUDA without fbgemm's CUDA build: the fused CPU kernel has no Adam, so the tables use
  the DENSE kernel and our `RowwiseAdamW` applied in backward, with the same formula, on the
  tables' device. `fused_params_for(...)` then returns {"optimizer_class", "optimizer_kwargs",
  "compute_kernel"}: apply `optimizer_class(**optimizer_kwargs)` in backward to unsharded
  tables, or give `optimizer_kwargs` to lumrec's RowwiseAdamW sharders under DMP.

    >>> fused_params_for("cpu", lr=0.01)["optimizer_kwargs"]["lr"]
    0.01
    >>> fused_params_for("cuda", lr=0.01, fused=False)["optimizer_class"].__name__
    'RowwiseAdamW'

Everything that is not an embedding table goes to `build_dense_optimizer` (plain AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch

from lumrec.optim.rowwise_adamw import RowwiseAdamW

CPU_KEYS = ("optimizer_class", "optimizer_kwargs", "compute_kernel")
# fbgemm's fused TBE training op with PARTIAL_ROWWISE_ADAM (has a CUDA kernel only in CUDA builds).
_FUSED_ADAM_OP = "fbgemm::split_embedding_codegen_lookup_partial_rowwise_adam_function_pt2"


@dataclass
class EmbeddingOptimConfig:
    """Hyper-parameters shared by the fused CUDA kernel and RowwiseAdamW (and by the dense AdamW)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    @property
    def betas(self) -> tuple[float, float]:
        """(beta1, beta2) as torch optimizers take them."""
        return (self.beta1, self.beta2)


def _check(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if lr < 0 or eps < 0 or weight_decay < 0:
        raise ValueError(f"optimizer: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"optimizer: betas={betas} must be two numbers in [0, 1)")


def fbgemm_has_cuda() -> bool:
    """True if the installed fbgemm-gpu is a CUDA build (its fused training kernels run on CUDA)."""
    try:
        import fbgemm_gpu
    except ImportError:  # torchrec without fbgemm (e.g. CUDA torch with torchrec's pure-Python parts)
        return False
    if getattr(fbgemm_gpu, "__variant__", "") in ("cuda", "rocm"):
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(_FUSED_ADAM_OP, "CUDA")


def fused_params_for(
    device: Union[torch.device, str],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: Optional[bool] = None,
) -> dict[str, Any]:
    """The table optimizer for `device`: fbgemm's fused PARTIAL_ROWWISE_ADAM params, or RowwiseAdamW settings.

    `fused` None: fused where it can run, i.e. on CUDA with a CUDA build of fbgemm-gpu
    (`fbgemm_has_cuda`); else (CPU, or CUDA with fbgemm's CPU build or none) RowwiseAdamW,
    which runs on the tensors' device. True forces the fused params, False RowwiseAdamW.
    """
    _check(lr, betas, eps, weight_decay)
    device = torch.device(device)
    if fused is None:
        fused = device.type == "cuda" and fbgemm_has_cuda()
    if fused:
        # Imported here: fbgemm's training module is heavy and only the fused path needs it.
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

        return {
            "optimizer": EmbOptimType.PARTIAL_ROWWISE_ADAM,
            "learning_rate": float(lr),
            "beta1": float(betas[0]),
            "beta2": float(betas[1]),
            "eps": float(eps),
            "weight_decay": float(weight_decay),
            # DECOUPLE: w -= lr * wd * w outside the Adam ratio, i.e. AdamW (also what
            # RowwiseAdamW does); L2 would add wd * w to the gradient instead.
            "weight_decay_mode": WeightDecayMode.DECOUPLE,
        }
    return {
        "optimizer_class": RowwiseAdamW,
        "optimizer_kwargs": rowwise_adamw_kwargs(lr, betas, eps, weight_decay),
        # torchrec's EmbeddingComputeKernel.DENSE.value, spelled out so that this stays cheap to
        # import (torchrec.distributed takes seconds).
        "compute_kernel": "dense",
    }


def rowwise_adamw_kwargs(
    lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> dict[str, Any]:
    """RowwiseAdamW's keyword arguments for these hyper-parameters (what a checkpoint's table group records on any device)."""
    _check(lr, betas, eps, weight_decay)
    return {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])), "eps": float(eps), "weight_decay": float(weight_decay)}


def build_dense_optimizer(
    params: Iterable[Any],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW over the dense (non-embedding) parameters, with the same hyper-parameter names."""
    _check(lr, betas, eps, weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
