"""Row-wise AdamW for embedding tables: per-element first moment, one second moment per row.

The update for a touched row r of width D at step t is (the same arithmetic as fbgemm's
PARTIAL_ROWWISE_ADAM with decoupled weight decay, so the CPU path here and the fused CUDA
kernel train alike):

    m[r]  = beta1 * m[r] + (1 - beta1) * g[r]                  (per element)
    v[r]  = beta2 * v[r] + (1 - beta2) * mean_d(g[r, d] ** 2)  (one scalar per row)
    w[r] -= lr * ( m[r] / (1 - beta1**t) / (sqrt(v[r] / (1 - beta2**t)) + eps) + wd * w[r] )

A row is "touched" when its (summed) gradient has any nonzero element; every other row keeps
its weight, m and v bit-identical (no moment decay, no weight decay), as a sparse/lazy optimizer
must for tables with millions of rows.

Step count t for bias correction, `bias_correction=`:
  * "global" (default): one counter per parameter, advanced on every step() in which the
    parameter has a gradient, also for rows not touched. This is fbgemm's choice (its `iter`),
    so a model trained with the fused CUDA kernel and one trained here follow the same formula.
    Consequence: a row first touched late gets nearly no bias correction (1 - beta**t ~ 1), so
    its first updates are about (1 - beta1) / sqrt(1 - beta2) times smaller than Adam's.
  * "row": one counter per row, advanced only when the row is touched; the bias correction is
    then exact for every row (what "lazy Adam" would do), at the cost of one int64 per row.

Layout: a 2-D parameter is a table with rows along dim 0. A 1-D parameter can hold several
tables back to back (fbgemm's DenseTableBatchedEmbeddingBagsCodegen keeps a torchrec group in
one flat tensor); give its layout with the param-group option `segments`, a list of
(element_offset, num_rows, dim), one group per such parameter.

Gradients: dense, or sparse COO (what `nn.Embedding(sparse=True)` and
`lumrec.optim.sparse_table_gradients` give a 2-D table, or `lumrec.optim.sparse_kernel_grads` a
flat DENSE-kernel weight). With a sparse gradient a step reads and writes only the rows it lists:
O(rows touched), whatever the table size.

State (`exp_avg` like the weight, `exp_avg_sq_row` and `row_step` one entry per row, `step`)
lives on `state_device` ("cpu" by default, so tables on an accelerator keep their optimizer
state in host memory); it is float32, or float64 for a float64 weight.

    >>> import torch
    >>> table = torch.nn.Embedding(1000, 4, sparse=True)
    >>> opt = RowwiseAdamW(table.parameters(), lr=0.1)
    >>> before = table.weight.detach().clone()
    >>> table(torch.tensor([3, 3, 7])).sum().backward()
    >>> opt.step()
    >>> (table.weight != before).any(1).nonzero().flatten().tolist()   # only the looked-up rows moved
    [3, 7]
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Sequence, Union

import torch

Segment = tuple[int, int, int]  # (element offset, number of rows, row width)
_BIAS_CORRECTION_MODES = ("global", "row")


def _state_dtype(param: torch.Tensor) -> torch.dtype:
    """float64 weights keep float64 state; every other dtype (fp32, bf16, fp16) gets float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()`, without its sort when the ids are already strictly increasing.

    Producers that sum duplicates in backward (`lumrec.optim.sparse_grads`, `sparse_kernel_grads`)
    hand over sorted unique ids, but autograd drops the tensor's coalesced flag on the way to
    `.grad`; checking the order is one pass, sorting again a sort of every element.
    """
    if grad.is_coalesced() or grad.sparse_dim() != 1:
        return grad.coalesce()
    ids = grad._indices()[0]
    if ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape, is_coalesced=True, check_invariants=False)
    return grad.coalesce()


class RowwiseAdamW(torch.optim.Optimizer):
    """AdamW for embedding tables with a row-wise second moment that updates only touched rows."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        bias_correction: Literal["global", "row"] = "global",
        state_device: Optional[Union[str, torch.device]] = "cpu",
        segments: Optional[Sequence[Segment]] = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"RowwiseAdamW: invalid lr {lr}")
        if eps < 0.0:
            raise ValueError(f"RowwiseAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"RowwiseAdamW: invalid betas {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"RowwiseAdamW: invalid weight_decay {weight_decay}")
        if bias_correction not in _BIAS_CORRECTION_MODES:
            raise ValueError(
                f"RowwiseAdamW: bias_correction must be one of {_BIAS_CORRECTION_MODES}, got {bias_correction!r}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            segments=None if segments is None else [tuple(int(x) for x in s) for s in segments],
        )
        # Kept outside the param groups: where state lives is a property of this process,
        # not of a checkpoint, so a checkpoint written on one machine loads on another.
        self._state_device = None if state_device is None else torch.device(state_device)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as the base class does, then reject layouts the step cannot handle."""
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # ----------------------------------------------------------------------------- layout

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        """Reject layouts the step cannot handle, naming the offending parameter shape."""
        segments = group.get("segments")
        for p in group["params"]:
            if segments is None:
                if p.dim() != 2:
                    raise ValueError(
                        f"RowwiseAdamW: parameter of shape {tuple(p.shape)} is not a 2-D table; "
                        "pass segments=[(offset, rows, dim), ...] for a flat multi-table parameter"
                    )
                continue
            if len(group["params"]) != 1:
                raise ValueError("RowwiseAdamW: a param group with `segments` must hold exactly one parameter")
            if p.dim() != 1 or not p.is_contiguous():
                raise ValueError(
                    f"RowwiseAdamW: `segments` needs a contiguous 1-D parameter, got shape {tuple(p.shape)}"
                )
            for off, rows, dim in segments:
                if off < 0 or rows < 0 or dim <= 0 or off + rows * dim > p.numel():
                    raise ValueError(
                        f"RowwiseAdamW: segment (offset={off}, rows={rows}, dim={dim}) does not fit "
                        f"a parameter of {p.numel()} elements"
                    )

    @staticmethod
    def _segments(group: dict[str, Any], p: torch.Tensor) -> list[Segment]:
        """The (offset, rows, dim) tables inside `p`; a 2-D parameter is one table."""
        if group.get("segments") is None:
            return [(0, p.shape[0], p.shape[1])]
        return list(group["segments"])

    def _device_for(self, p: torch.Tensor) -> torch.device:
        return p.device if self._state_device is None else self._state_device

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """Zero moments on the state device; one second-moment and step entry per row."""
        state = self.state[p]
        if not state:
            dev, dt = self._device_for(p), _state_dtype(p)
            n_rows = sum(rows for _, rows, _ in self._segments(group, p))
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=dt, device=dev)
            state["exp_avg_sq_row"] = torch.zeros(n_rows, dtype=dt, device=dev)
            state["row_step"] = torch.zeros(n_rows, dtype=torch.int64, device=dev)
        return state

    def init_state(self) -> None:
        """Create the (zero) state of every parameter now, not at its first step.

        So that a checkpoint can be loaded into the state tensors in place (DCP), or views of
        them handed out, before training starts. No step is counted.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(group, p)

    # ------------------------------------------------------------------------------- step

    @staticmethod
    def _touched_rows(grad_2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, their gradient rows) for rows whose gradient has any nonzero element."""
        if grad_2d.is_sparse:
            g = _coalesced(grad_2d)  # sums duplicate ids, as the dense gradient would
            if g.sparse_dim() != 1:
                return RowwiseAdamW._touched_rows(g.to_dense())
            ids, vals = g.indices()[0], g.values()
            keep = vals.ne(0).flatten(1).any(dim=1)
            return ids[keep], vals[keep]
        ids = grad_2d.ne(0).any(dim=1).nonzero().squeeze(1)
        return ids, grad_2d.index_select(0, ids)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[torch.Tensor]:
        """Apply one update to the touched rows of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._step_param(group, p, p.grad)
        return loss

    @staticmethod
    def _flat_sparse_rows(grad: torch.Tensor, off: int, rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row ids, gradient rows) of one segment of a coalesced 1-D sparse gradient, without densifying.

        A producer that lists whole rows (all `dim` elements of each, as
        `lumrec.optim.sparse_kernel_grads` does) is read in place; anything else is scattered into
        the segment's rows that it touches.
        """
        elements, values = grad.indices()[0], grad.values()
        lo, hi = torch.searchsorted(elements, torch.tensor([off, off + rows * dim], device=elements.device)).tolist()
        local, vals = elements[lo:hi] - off, values[lo:hi]
        if local.numel() % dim == 0:
            by_row = local.view(-1, dim)
            row_ids = by_row[:, 0] // dim
            if torch.equal(by_row, (row_ids * dim).unsqueeze(1) + torch.arange(dim, device=local.device)):
                g_rows = vals.view(-1, dim)
                keep = g_rows.ne(0).any(dim=1)
                return row_ids[keep], g_rows[keep]
        row_ids, inverse = torch.unique(local // dim, sorted=True, return_inverse=True)
        g_rows = vals.new_zeros(row_ids.numel(), dim)
        g_rows.index_put_((inverse, local % dim), vals, accumulate=True)
        keep = g_rows.ne(0).any(dim=1)
        return row_ids[keep], g_rows[keep]

    def _step_param(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> None:
        state = self._init_state(group, p)
        state["step"] += 1
        flat_sparse = grad.is_sparse and group.get("segments") is not None
        if flat_sparse:
            grad = _coalesced(grad)  # sorted element ids, duplicates summed
        row_base = 0
        for off, rows, dim in self._segments(group, p):
            if group.get("segments") is None:
                w2d, g2d, m2d = p.data, grad, state["exp_avg"]
            else:
                end = off + rows * dim
                w2d = p.data[off:end].view(rows, dim)
                g2d = None if flat_sparse else grad[off:end].view(rows, dim)
                m2d = state["exp_avg"][off:end].view(rows, dim)
            v = state["exp_avg_sq_row"][row_base : row_base + rows]
            row_step = state["row_step"][row_base : row_base + rows]
            row_base += rows
            ids, g_rows = self._flat_sparse_rows(grad, off, rows, dim) if g2d is None else self._touched_rows(g2d)
            if ids.numel() == 0:
                continue
            self._update_rows(group, state, w2d, m2d, v, row_step, ids, g_rows)

    @staticmethod
    def _update_rows(
        group: dict[str, Any],
        state: dict[str, Any],
        w2d: torch.Tensor,
        m2d: torch.Tensor,
        v: torch.Tensor,
        row_step: torch.Tensor,
        ids: torch.Tensor,
        g_rows: torch.Tensor,
    ) -> None:
        """Gather touched rows to the state device, apply the formula there, scatter back."""
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        sdev, sdt = m2d.device, m2d.dtype
        ids_s = ids.to(sdev)
        g = g_rows.to(device=sdev, dtype=sdt)

        m = m2d.index_select(0, ids_s).mul_(beta1).add_(g, alpha=1.0 - beta1)
        v_rows = v.index_select(0, ids_s).mul_(beta2).add_(g.square().mean(dim=1), alpha=1.0 - beta2)
        m2d.index_copy_(0, ids_s, m)
        v.index_copy_(0, ids_s, v_rows)

        row_step.index_add_(0, ids_s, torch.ones_like(ids_s))
        if group["bias_correction"] == "row":
            t = row_step.index_select(0, ids_s).to(sdt)
        else:
            t = torch.full((ids_s.numel(),), float(state["step"]), dtype=sdt, device=sdev)
        bc1 = 1.0 - torch.pow(beta1, t)
        bc2 = 1.0 - torch.pow(beta2, t)
        denom = (v_rows / bc2).sqrt_().add_(eps)  # per row
        update = m / (bc1 * denom).unsqueeze(1)

        w = w2d.index_select(0, ids).to(device=sdev, dtype=sdt)
        # Decoupled decay uses the weight before this step's Adam move, as fbgemm and AdamW do.
        w_new = w - lr * (update + wd * w)
        w2d.index_copy_(0, ids, w_new.to(device=w2d.device, dtype=w2d.dtype))

    # ------------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as the base class does, then put state back on the state device in its own dtypes.

        The base class casts every state tensor to the parameter's dtype and device, which would
        turn `row_step` into floats, round fp32 moments through a bf16 weight's dtype and move
        host-memory state onto the accelerator.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            dev, dt = self._device_for(p), _state_dtype(p)
            st = self.state[p]
            st["step"] = saved["step"].detach().to(dtype=torch.float32, device="cpu").clone()
            st["exp_avg"] = saved["exp_avg"].detach().to(dtype=dt, device=dev).clone()
            st["exp_avg_sq_row"] = saved["exp_avg_sq_row"].detach().to(dtype=dt, device=dev).clone()
            st["row_step"] = saved["row_step"].detach().to(dtype=torch.int64, device=dev).clone()
