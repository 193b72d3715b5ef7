"""Where a job computes: the device setting (`auto` | `cpu` | `cuda`), batch moves, bf16 autocast, activation memory.

A job resolves its setting once (`resolve_device`): `cpu`; `cuda` (an error naming the config key
when this torch sees no GPU); `auto` = `cuda` where a GPU is visible, else `cpu`. Under
torchrun / torchx each rank takes the GPU of its `LOCAL_RANK`. Loaders stay on the CPU; every
batch goes to the device through `move_to_device` (pinned host memory and non-blocking copies
on CUDA; on the CPU the batch's own tensors, untouched). Results that leave the model for
metrics or files come back with `.cpu()`.

`autocast(device, "bf16")` runs the forward in bfloat16 where PyTorch's autocast lists an op
(matmuls, linear layers; reductions and losses stay in float32); parameters and optimizer state
stay float32. `activation_meter` measures the memory a training forward keeps for the backward:
on CUDA the peak allocated during the forward minus what was allocated before it; on the CPU the
bytes of the tensors autograd saves for the backward (each storage once, parameters excluded),
an estimate from `torch.autograd.graph.saved_tensors_hooks`.

Example::

    >>> import torch
    >>> resolve_device("cpu"), resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    (device(type='cpu'), True)
    >>> move_to_device({"ids": torch.arange(3), "n": 3}, torch.device("cpu"))["ids"].tolist()
    [0, 1, 2]
    >>> with autocast(torch.device("cpu"), "bf16"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    >>> w = torch.nn.Parameter(torch.ones(4, 4))
    >>> meter = activation_meter(torch.device("cpu"), [w])
    >>> with meter:
    ...     y = (torch.ones(8, 4) @ w).relu()      # saves the input (8 x 4 floats) and the relu's output (8 x 4)
    >>> meter.bytes, meter.method
    (256, 'saved tensors (CPU estimate)')
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, ContextManager, Iterable

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from lumrec.config import ConfigValueError

__all__ = [
    "DEVICES",
    "PRECISIONS",
    "ActivationMeter",
    "activation_meter",
    "autocast",
    "check_device_setting",
    "check_precision",
    "format_bytes",
    "module_device",
    "move_to_device",
    "resolve_device",
    "set_activation_checkpointing",
]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def _split_key(key: str) -> tuple[str, str]:
    """("train", "device") from "train.device": ConfigValueError wants the section apart."""
    section, _, name = key.rpartition(".")
    return section, name


def check_device_setting(value: Any, key: str = "device") -> None:
    """Refuse a device setting outside `DEVICES`, naming the config key."""
    if value not in DEVICES:
        section, name = _split_key(key)
        raise ConfigValueError(name, f"must be one of {DEVICES}, got {value!r}", section)


def check_precision(value: Any, key: str = "precision") -> None:
    """Refuse a precision outside `PRECISIONS`, naming the config key."""
    if value not in PRECISIONS:
        section, name = _split_key(key)
        raise ConfigValueError(name, f"must be one of {PRECISIONS}, got {value!r}", section)


def _local_rank() -> int:
    raw = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable LOCAL_RANK={raw!r} is not an integer") from None


def resolve_device(setting: str = "cpu", key: str = "device") -> torch.device:
    """The torch device of a job's `setting` (`auto` | `cpu` | `cuda`); `key` names the setting in errors.

    A CUDA device is this process's local GPU: `cuda:LOCAL_RANK` under torchrun / torchx, `cuda:0` alone.
    """
    check_device_setting(setting, key)
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    section, name = _split_key(key)
    if not torch.cuda.is_available():
        raise ConfigValueError(name, f"is 'cuda' but this torch ({torch.__version__}) sees no CUDA GPU; set it to 'cpu' or "
                               "'auto', or install the CUDA build (docs/gpu.md)", section)
    local = _local_rank()
    count = torch.cuda.device_count()
    if not 0 <= local < count:
        raise ConfigValueError(name, f"asks for this rank's GPU, cuda:{local} (LOCAL_RANK), but {count} GPU(s) are visible; "
                               "start at most one rank per GPU", section)
    return torch.device("cuda", local)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of `module`'s first parameter or buffer (the CPU for a module without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def move_to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor on `device`: tensors, KeyedJaggedTensors, dataclasses, dicts, lists and tuples, recursively.

    To a GPU, CPU tensors are copied through pinned (page-locked) memory without blocking the host,
    so the copy overlaps what the host does next; a tensor already on `device` is returned as it is
    (on the CPU nothing is copied). Other values (numbers, strings, None) are returned as they are.
    """
    return _walk(obj, torch.device(device))


def _move(value: torch.Tensor | KeyedJaggedTensor, device: torch.device) -> Any:
    current = value.device() if isinstance(value, KeyedJaggedTensor) else value.device
    if current == device:
        return value
    if isinstance(value, KeyedJaggedTensor) and current.type == "cpu":
        # Lengths, offsets and per-key sizes are computed here, on the CPU, and travel with the copy: on the
        # device, reading per-key sizes would cost a host sync, and the offsets' cumsum is an fbgemm op
        # that fbgemm's CPU build has no CUDA kernel for.
        value.lengths(), value.offsets(), value.length_per_key(), value.offset_per_key()
    if current.type == "cpu":
        # A page-locked copy first, so that the device copy is asynchronous (PyTorch's pinned-memory
        # allocator keeps the block alive until the copy has run).
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def _walk(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, (torch.Tensor, KeyedJaggedTensor)):
        return _move(obj, device)
    if isinstance(obj, (KeyedTensor, JaggedTensor)):  # torchrec containers without pin_memory: a plain copy
        return obj if obj.device() == device else obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _walk(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {k: _walk(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(_walk(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_walk(v, device) for v in obj)
    return obj


def autocast(device: torch.device, precision: str = "fp32") -> ContextManager[Any]:
    """The forward's precision: nothing for "fp32"; bfloat16 autocast on `device`'s type for "bf16"."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


class ActivationMeter:
    """Context manager around a training forward; `bytes` = the activation memory it kept, `method` = how it was measured."""

    method = ""

    def __init__(self) -> None:
        self.bytes: int | None = None

    def __enter__(self) -> "ActivationMeter":
        raise NotImplementedError

    def __exit__(self, *exc: Any) -> None:
        raise NotImplementedError


class _SavedTensorMeter(ActivationMeter):
    """CPU estimate: bytes of the tensors autograd saves for the backward, each storage counted once, parameters left out."""

    method = "saved tensors (CPU estimate)"

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self._exclude = {ptr for ptr in map(_storage_ptr, parameters) if ptr is not None}
        self._seen: set[int] = set()
        self._hooks: Any = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = _storage_ptr(tensor)
        if ptr is not None and ptr not in self._exclude and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor  # kept as it is: measuring does not change what backward computes

    def __enter__(self) -> "ActivationMeter":
        self.bytes, self._seen = 0, set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._seen = set()


def _storage_ptr(tensor: Any) -> int | None:
    """The address of `tensor`'s storage; None for tensors without one (meta, sharded or wrapper tensors)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return None


class _CudaPeakMeter(ActivationMeter):
    """CUDA: the peak memory allocated during the forward minus what was allocated when it started."""

    method = "CUDA peak allocated during the forward"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._base = 0

    def __enter__(self) -> "ActivationMeter":
        torch.cuda.synchronize(self.device)
        self._base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base


def activation_meter(device: torch.device, parameters: Iterable[torch.Tensor] = ()) -> ActivationMeter:
    """The meter for `device`: CUDA's allocator peak there, the saved-tensor estimate elsewhere (`parameters` excluded)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _CudaPeakMeter(device)
    return _SavedTensorMeter(parameters)


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing on or off in every layer stack of `model` that offers it; returns how many there are.

    A stack offers it with a boolean attribute `activation_checkpointing` (lumrec's HSTU and
    transformer stacks): in training it then recomputes each layer's activations in the backward.
    """
    stacks = [m for m in model.modules() if isinstance(getattr(m, "activation_checkpointing", None), bool)]
    for stack in stacks:
        stack.activation_checkpointing = bool(enabled)
    return len(stacks)


def format_bytes(n: float | None) -> str:
    """`n` bytes as B / KiB / MiB / GiB with one decimal ("unmeasured" for None).

        >>> format_bytes(1536), format_bytes(3 * 2**30), format_bytes(None)
        ('1.5 KiB', '3.0 GiB', 'unmeasured')
    """
    if n is None:
        return "unmeasured"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B" if isinstance(n, float) else f"{n} B"
