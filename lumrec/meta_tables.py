"""Embedding tables built on the meta device, each shard later filled with the rows a CPU build would hold.

Under N ranks no rank may hold a whole table (a 1B-row table exceeds a host), yet a seeded N-rank
run must start from the same weights as the 1-process run. `tables_on_meta()` builds every
torchrec `EmbeddingBagCollection` / `EmbeddingCollection` created inside it on `meta` and
records, per table, what its initialisation did (an `InitTape`): the in-place ops applied to the
weight and, for each random one, the generator state it started from. The global generator is
advanced exactly as the CPU build advances it (the draws are made in chunks and discarded), so
every other parameter of the model gets the same values as in one process. `InitTape.rows(r0,
r1)` then replays the ops on rows r0..r1 only: a random op restarts from its recorded state and
skips the r0 * dim draws before the range. This works because CPU `uniform_` draws one number
per element in order (a row range is a slice of one stream). `normal_` (CPU: Box-Muller on blocks
of 16 uniforms, 16 more for a partial last block) only advances the generator when a later op
overwrites it, as torchrec's uniform init overwrites nn.EmbeddingBag's normal init. torch 2.13's
`nn.init.trunc_normal_` (normal_, then whole-table redraws while any element is out of range;
it returns early on meta tensors, so it is intercepted) is replayed round by round: a 16-aligned
slice of a `normal_` call is reproduced from the call's generator state. Other inits that cannot
be replayed per row range raise `MetaInitError` naming them. Cost: memory is one shard plus a
chunk (plus the still-rejected offsets of a truncated normal, ~5% of its elements as int32, while
it is built); time is O(table) per table and draw round on every rank (the draws before a rank's
rows are generated and dropped).

    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> cfg = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])]
    >>> _ = torch.manual_seed(0); cpu = EmbeddingBagCollection(tables=cfg); after_cpu = torch.rand(1)
    >>> with tables_on_meta():
    ...     _ = torch.manual_seed(0); meta = EmbeddingBagCollection(tables=cfg); after_meta = torch.rand(1)
    >>> meta.embedding_bags["t"].weight.is_meta, torch.equal(after_cpu, after_meta)
    (True, True)
    >>> tape = init_tape(meta.embedding_bags["t"].weight)
    >>> torch.equal(tape.rows(3, 7), cpu.embedding_bags["t"].weight[3:7])
    True
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

log = logging.getLogger(__name__)

__all__ = ["InitTape", "MetaInitError", "build_with_meta_tables", "init_tape", "materialise_shards", "table_init_tapes",
           "tables_on_meta"]

class MetaInitError(ValueError):
    """A table's initialisation cannot be built on meta and replayed per row range (the message says which op)."""


_CHUNK = 1 << 22  # elements per discarded draw: memory stays ~16 MB whatever the table size
_TAPE_ATTR = "_lumrec_init_tape"
# Random in-place ops whose CPU kernel draws one number per element, in order.
_STREAMING_RANDOM = {"uniform_"}
_OTHER_RANDOM = {"normal_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_", "geometric_"}
# nn.init functions that return early for meta tensors (torch 2.13), so no dispatch sees them.
_META_SKIPPING_INITS = ("orthogonal_", "sparse_", "dirac_")
# Ops that set every element without reading the old values: the ops before them do not matter.
_OVERWRITES = {"uniform_", "normal_", "trunc_normal_", "bernoulli_", "exponential_", "random_", "cauchy_", "log_normal_", "geometric_", "fill_", "zero_", "copy_"}
# Element-wise in-place ops: a row range of their result depends on that row range only.
_ELEMENTWISE = {
    "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_", "clamp_max_", "erfinv_", "fill_", "zero_",
    "neg_", "abs_", "exp_", "log_", "sqrt_", "tanh_", "sigmoid_", "pow_", "copy_",
}


@dataclass
class _Op:
    name: str
    func: Callable[..., Any]
    args: tuple[Any, ...]  # without the table (the first argument)
    kwargs: dict[str, Any]
    generator_state: Optional[torch.Tensor] = None  # random ops: where their stream starts
    replayable: bool = True  # False: a random op whose row ranges are no slices of one stream (normal_)
    elements: Optional[Callable[[int, int], torch.Tensor]] = None  # sets elements [a, b) to these values (flat)


@dataclass
class InitTape:
    """How one meta table was initialised: shape, dtype and the in-place ops, in order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    ops: list[_Op] = field(default_factory=list)

    @property
    def row_numel(self) -> int:
        """Elements per row."""
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n

    def rows(self, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows start..stop of the table as the CPU build initialises them (written into `out` if given)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"InitTape {self.name}: rows {start}..{stop} outside the table's {self.shape[0]} rows")
        shape = (stop - start, *self.shape[1:])
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        elif tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"InitTape {self.name}: out must be a contiguous {shape} tensor, got {tuple(out.shape)}")
        live = self.check()
        with torch.no_grad():
            for op in live:
                if op.elements is not None:
                    out.view(-1).copy_(op.elements(start * self.row_numel, stop * self.row_numel))
                elif op.generator_state is not None:
                    gen = torch.Generator()
                    gen.set_state(op.generator_state)
                    _discard(gen, start * self.row_numel, self.dtype, op)
                    op.func(out, *op.args, **{**op.kwargs, "generator": gen})
                else:
                    op.func(out, *op.args, **op.kwargs)
        return out


    def check(self) -> list[_Op]:
        """The ops that decide the values (from the last overwriting one); MetaInitError if one cannot be replayed."""
        live = self.ops[self._last_overwrite() :]
        dead_end = [op.name for op in live if not op.replayable]
        if dead_end:
            raise MetaInitError(
                f"InitTape {self.name}: the values come from {dead_end[0]}, which cannot be replayed row range by row "
                "range (its CPU kernel does not draw one number per element in order); if the table has an init_fn, "
                "it did nothing on meta (e.g. nn.init.orthogonal_ returns early for meta tensors). Initialise tables "
                "with uniform_-based inits (torchrec's default, nn.init.uniform_) or nn.init.trunc_normal_"
            )
        return live

    def _last_overwrite(self) -> int:
        """Index of the last op that sets every element regardless of the old values (earlier ones are dead)."""
        for i in range(len(self.ops) - 1, -1, -1):
            if self.ops[i].name in _OVERWRITES:
                return i
        return 0


def init_tape(weight: torch.Tensor) -> Optional[InitTape]:
    """The InitTape of a table weight built inside `tables_on_meta()`, or None."""
    return getattr(weight, _TAPE_ATTR, None)


def _advance(gen: torch.Generator, shape: tuple[int, ...], tape: InitTape, op: _Op) -> None:
    """Advance `gen` exactly as `op` on a CPU tensor of `shape` would, without a table-sized buffer when large."""
    numel = 1
    for s in shape:
        numel *= s
    if numel <= _CHUNK:  # small: run the op itself
        op.func(torch.empty(shape, dtype=tape.dtype), *op.args, **{**op.kwargs, "generator": gen})
    elif op.name == "uniform_":
        _discard(gen, numel, tape.dtype, op)
    elif op.name == "normal_" and tape.dtype == torch.float32:
        # CPU normal_ on >= 16 contiguous floats draws one uniform per element, then 16 more for a
        # partial last block of 16 (its Box-Muller works on blocks of 16); checked by the tests.
        uniform = _Op("uniform_", torch.ops.aten.uniform_.default, (0.0, 1.0), {})
        _discard(gen, numel + (16 if numel % 16 else 0), tape.dtype, uniform)
    else:
        raise MetaInitError(f"tables_on_meta: table {tape.name}: {op.name} on {numel} {tape.dtype} elements: "
                         "how many numbers it draws is not known here; initialise tables with uniform_-based inits")


def _discard(gen: torch.Generator, count: int, dtype: torch.dtype, op: _Op) -> None:
    """Advance `gen` by the draws `op` makes for `count` elements, in chunks (no table-sized buffer)."""
    scratch = torch.empty(min(count, _CHUNK), dtype=dtype)
    while count > 0:
        n = min(count, _CHUNK)
        op.func(scratch[:n], *op.args, **{**op.kwargs, "generator": gen})
        count -= n


class _Recorder(TorchDispatchMode):
    """Records in-place ops on registered meta tables (and advances the generators they draw from)."""

    def __init__(self) -> None:
        super().__init__()
        self.tapes: dict[int, tuple[InitTape, int]] = {}  # storage id -> (tape, numel)
        self.building = False  # inside a patched EBC/EC constructor: every meta tensor is a table

    def register(self, weight: torch.Tensor, name: str) -> InitTape:
        """The tape of `weight` (created on first sight, named `name`), also kept on the tensor."""
        key = _storage_id(weight)
        if key in self.tapes:
            tape = self.tapes[key][0]
            tape.name = name
        else:
            tape = InitTape(name, tuple(weight.shape), weight.dtype)
            self.tapes[key] = (tape, weight.numel())
        setattr(weight, _TAPE_ATTR, tape)
        return tape

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None) -> Any:
        kwargs = dict(kwargs or {})
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and first.is_meta):
            return func(*args, **kwargs)
        mutates = bool(func._schema.arguments) and func._schema.arguments[0].alias_info is not None and func._schema.arguments[0].alias_info.is_write
        hit = self.tapes.get(_storage_id(first))
        if hit is None and self.building and mutates:
            # Inside a table constructor every meta tensor is a table (named once it is built).
            self.register(first, "(building)")
            hit = self.tapes[_storage_id(first)]
        if hit is None:
            return func(*args, **kwargs)
        tape, numel = hit
        name = func.overloadpacket.__name__
        if not mutates:
            return func(*args, **kwargs)  # views and reads of the meta weight
        if first.numel() != numel or first.storage_offset() != 0 or not first.is_contiguous():
            raise MetaInitError(f"tables_on_meta: table {tape.name}: {name} on part of the table cannot be replayed per row range; "
                             "initialise whole tables")
        if name not in _STREAMING_RANDOM and name not in _OTHER_RANDOM and name not in _ELEMENTWISE:
            raise MetaInitError(f"tables_on_meta: table {tape.name}: in-place op {name} is not known to be element-wise, "
                             "so it cannot be replayed per row range")
        rest = args[1:]
        if any(isinstance(a, torch.Tensor) and (a.numel() > 1 or a.is_meta) for a in (*rest, *kwargs.values())):
            raise MetaInitError(f"tables_on_meta: table {tape.name}: {name} with a tensor operand cannot be replayed per row range")
        if name in _STREAMING_RANDOM or name in _OTHER_RANDOM:
            gen = kwargs.pop("generator", None)
            gen = gen if gen is not None else torch.default_generator
            if gen.device.type != "cpu":
                raise MetaInitError(f"tables_on_meta: table {tape.name}: {name} draws from a {gen.device} generator; tables are initialised on CPU")
            op = _Op(name, func, rest, kwargs, gen.get_state(), replayable=name in _STREAMING_RANDOM)
            # Advance the generator as the CPU build would: every later parameter gets its 1-process values.
            _advance(gen, tuple(first.shape), tape, op)
        else:
            op = _Op(name, func, rest, kwargs)
        tape.ops.append(op)
        return func(*args, **kwargs)


def _normal_chunks(gen: torch.Generator, numel: int, chunk: int, mean: float, std: float) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, values) over elements 0..numel of one CPU `normal_(mean, std)` call on `numel` float32s, drawn from `gen` in chunks.

    CPU normal_ on >= 16 contiguous floats fills one uniform per element, turns each block of 16
    into normals (Box-Muller), and, when numel % 16 != 0, draws 16 more uniforms for the last 16
    elements. A chunk starting at a multiple of 16 therefore reproduces its blocks.
    """
    full = numel // 16 * 16
    body_end = numel - 16 if numel % 16 else numel  # elements the tail does not overwrite
    chunk = max(16, chunk // 16 * 16)
    for c0 in range(0, full, chunk):
        values = torch.empty(min(chunk, full - c0)).normal_(mean, std, generator=gen)
        if c0 < body_end:
            yield c0, values[: body_end - c0]
    if numel % 16:
        torch.empty(numel - full).uniform_(generator=gen)  # the leftover elements' uniforms, unused
        yield numel - 16, torch.empty(16).normal_(mean, std, generator=gen)


def _normal_range(state: torch.Tensor, numel: int, start: int, stop: int, mean: float, std: float) -> torch.Tensor:
    """Elements start..stop of the `normal_` call of `_normal_chunks` from generator state `state` (skips the draws before)."""
    out = torch.empty(stop - start)
    full, body_end = numel // 16 * 16, (numel - 16 if numel % 16 else numel)
    a16 = start // 16 * 16
    if a16 < body_end:
        gen = torch.Generator()
        gen.set_state(state)
        _discard(gen, a16, torch.float32, _Op("uniform_", torch.ops.aten.uniform_.default, (0.0, 1.0), {}))
        end = min(-(-stop // 16) * 16, full)
        values = torch.empty(end - a16).normal_(mean, std, generator=gen)
        upto = min(stop, body_end)
        out[: upto - start] = values[start - a16 : upto - a16]
    if numel % 16 and stop > body_end:
        gen = torch.Generator()
        gen.set_state(state)
        _discard(gen, numel, torch.float32, _Op("uniform_", torch.ops.aten.uniform_.default, (0.0, 1.0), {}))
        tail = torch.empty(16).normal_(mean, std, generator=gen)
        lo = max(start, body_end)
        out[lo - start :] = tail[lo - body_end : stop - body_end]
    return out


def _trunc_normal_op(tape: InitTape, numel: int, mean: float, std: float, a: float, b: float, gen: torch.Generator) -> _Op:
    """torch 2.13's `nn.init.trunc_normal_` (normal_, then whole-table redraws of every element outside [a, b]) as a replayable op.

    Advances `gen` as that function does: the number of redraw rounds R is found by streaming the
    rounds and keeping only the still-rejected offsets (~5% of the elements after the first round
    for +-2 std). The generator state of each round is recorded; rows r0..r1 replay rounds 0..R
    over their own elements only.
    """
    p = (1.0 + math.erf((b - mean) / std / math.sqrt(2.0))) / 2.0 - (1.0 + math.erf((a - mean) / std / math.sqrt(2.0))) / 2.0
    if p <= 0.3 or tape.dtype != torch.float32:
        raise MetaInitError(f"tables_on_meta: table {tape.name}: trunc_normal_ with this range (p={p:.3f}) or dtype "
                            f"{tape.dtype} is not replayed per row range; build this model's tables on CPU")
    lo = torch.tensor(a, dtype=tape.dtype).item()
    hi = torch.tensor(b, dtype=tape.dtype).item()
    if numel <= _CHUNK:  # small: run it and keep the values
        values = torch.empty(numel)
        nn.init.trunc_normal_(values, mean, std, a, b, generator=gen)
        return _Op("trunc_normal_", torch.ops.aten.copy_.default, (), {}, elements=lambda s, e: values[s:e])
    states = [gen.get_state()]
    pending: dict[int, torch.Tensor] = {}  # chunk start -> offsets (in the chunk) still out of range
    for start, values in _normal_chunks(gen, numel, _CHUNK, mean, std):
        bad = ((values < lo) | (values > hi)).nonzero().flatten().to(torch.int32)
        if bad.numel():
            pending[start] = bad
    while pending:
        states.append(gen.get_state())
        for start, values in _normal_chunks(gen, numel, _CHUNK, mean, std):
            if start in pending:
                offsets = pending[start]
                drawn = values[offsets.long()]
                still = offsets[(drawn < lo) | (drawn > hi)]
                if still.numel():
                    pending[start] = still
                else:
                    del pending[start]

    def elements(first: int, stop: int) -> torch.Tensor:
        result = _normal_range(states[0], numel, first, stop, mean, std)
        for state in states[1:]:
            mask = (result < lo) | (result > hi)
            if not mask.any():
                break
            result = torch.where(mask, _normal_range(state, numel, first, stop, mean, std), result)
        return result

    return _Op("trunc_normal_", torch.ops.aten.copy_.default, (), {}, elements=elements)


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _table_weights(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, Optional[Callable[..., Any]]]]:
    """(table name, weight, init_fn) of a freshly built EBC or EC."""
    if isinstance(module, EmbeddingBagCollection):
        for cfg in module.embedding_bag_configs():
            yield cfg.name, module.embedding_bags[cfg.name].weight, cfg.init_fn
    else:
        for cfg in module.embedding_configs():
            yield cfg.name, module.embeddings[cfg.name].weight, cfg.init_fn


@contextlib.contextmanager
def tables_on_meta(enabled: bool = True) -> Iterator[None]:
    """Build torchrec EBCs/ECs created inside on `meta`, recording each table's init (module docstring).

    Everything else is built as usual. `enabled=False` does nothing (one call site for 1 and N ranks).
    """
    if not enabled:
        yield
        return
    recorder = _Recorder()
    originals = {cls: cls.__init__ for cls in (EmbeddingBagCollection, EmbeddingCollection)}

    def patched(cls: type) -> Callable[..., None]:
        original = originals[cls]
        signature = inspect.signature(original)

        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.arguments["device"] = torch.device("meta")
            outer, recorder.building = recorder.building, True
            try:
                original(*bound.args, **bound.kwargs)
            finally:
                recorder.building = outer
            with torch.no_grad():
                for name, weight, init_fn in _table_weights(self):
                    recorder.register(weight, name)
                    # An EBC's reset_parameters (its constructor's last step) skips init_fn on meta;
                    # apply it here, recorded, as the CPU build does. An EC applied it in its loop.
                    if isinstance(self, EmbeddingBagCollection) and init_fn is not None:
                        init_fn(weight)
                    init_tape(weight).check()  # an init_fn that skipped meta leaves the constructor's normal_

        return __init__

    def refuse_on_tables(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        # These nn.init functions return early on meta tensors, below any dispatch: the table
        # would keep no init and the generator would not advance.
        def guarded(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if tensor.is_meta and (recorder.building or _storage_id(tensor) in recorder.tapes):
                raise MetaInitError(f"tables_on_meta: nn.init.{name} on an embedding table cannot be built on meta "
                                 "(it skips meta tensors and its draws are not per element); build this model's "
                                 "tables on CPU, or initialise them with uniform_-based inits")
            return original(tensor, *args, **kwargs)

        return guarded

    original_trunc_normal = nn.init._no_grad_trunc_normal_

    def trunc_normal(tensor: torch.Tensor, mean: float, std: float, a: float, b: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # torch's returns early on meta (no draws); a table gets a replayable record instead.
        if not (tensor.is_meta and (recorder.building or _storage_id(tensor) in recorder.tapes)):
            return original_trunc_normal(tensor, mean, std, a, b, generator=generator)
        known = recorder.tapes.get(_storage_id(tensor))
        tape = known[0] if known is not None else recorder.register(tensor, "(building)")
        if known is not None and (tensor.numel() != known[1] or tensor.storage_offset() != 0 or not tensor.is_contiguous()):
            raise MetaInitError(f"tables_on_meta: table {tape.name}: trunc_normal_ on part of the table cannot be replayed per row range")
        gen = generator if generator is not None else torch.default_generator
        if gen.device.type != "cpu":
            raise MetaInitError(f"tables_on_meta: table {tape.name}: trunc_normal_ draws from a {gen.device} generator")
        tape.ops.append(_trunc_normal_op(tape, tensor.numel(), float(mean), float(std), float(a), float(b), gen))
        return tensor

    guarded_inits = {n: getattr(nn.init, n) for n in _META_SKIPPING_INITS if hasattr(nn.init, n)}
    try:
        for cls in originals:
            cls.__init__ = patched(cls)  # type: ignore[method-assign]
        for n, f in guarded_inits.items():
            setattr(nn.init, n, refuse_on_tables(n, f))
        nn.init._no_grad_trunc_normal_ = trunc_normal
        with recorder:
            yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init  # type: ignore[method-assign]
        for n, f in guarded_inits.items():
            setattr(nn.init, n, f)
        nn.init._no_grad_trunc_normal_ = original_trunc_normal


def table_init_tapes(collections: Mapping[str, nn.Module]) -> dict[str, InitTape]:
    """The InitTape of every meta table of `collections` (module FQN -> EBC/EC), by state-dict key."""
    out = {}
    for fqn, module in collections.items():
        for name, param in module.named_parameters():
            tape = init_tape(param)
            if param.is_meta and tape is not None:
                out[f"{fqn}.{name}" if fqn else name] = tape
    return out


@torch.no_grad()
def materialise_shards(dmp: nn.Module, tapes: Mapping[str, InitTape]) -> list[str]:
    """Fill each rank's local shards of the tables in `tapes` with their CPU-build rows; returns the keys filled."""
    state = dmp.state_dict()
    done = []
    for key, tape in tapes.items():
        if key not in state:
            raise ValueError(f"materialise_shards: table {key!r} is not in the sharded model's state_dict")
        target = state[key]
        shards = target.local_shards() if hasattr(target, "local_shards") else None
        if shards is None:  # an unsharded (e.g. data-parallel) table: the whole weight
            target.copy_(tape.rows(0, tape.shape[0]))
        else:
            for shard in shards:
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                if c0 == 0 and nc == tape.row_numel and shard.tensor.is_contiguous() and shard.tensor.device.type == "cpu":
                    tape.rows(r0, r0 + nr, out=shard.tensor)
                else:  # a column slice or another device: whole rows first (row range only)
                    shard.tensor.copy_(tape.rows(r0, r0 + nr)[:, c0 : c0 + nc])
        done.append(key)
    return done


T = TypeVar("T")


def build_with_meta_tables(build: Callable[[], T], what: str) -> T:
    """`build()` with its tables on meta (`tables_on_meta`); where an init cannot be replayed per row range,
    `build()` again with whole tables, from the same random state, so the other parameters are the same either way."""
    state = torch.random.get_rng_state()
    try:
        with tables_on_meta():
            return build()
    except MetaInitError as err:
        log.info("%s: embedding tables built whole on every rank, then sharded: %s", what, err)
        torch.random.set_rng_state(state)
        return build()
