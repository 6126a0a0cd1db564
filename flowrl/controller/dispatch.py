"""Dispatch modes: how a group call's arguments reach the ranks and how their results come back.

A mode is a pair of plain functions kept in a registry under a name:

    dispatch_fn(layout, args, kwargs) -> Plan        # which ranks run, with which arguments
    collect_fn(layout, outputs, context) -> result   # outputs: {rank: result} of the ranks that ran

``context`` is whatever the dispatch function put in ``Plan.context`` (``DP_COMPUTE``
keeps the padding there). A worker method picks its mode with ``@register``; users add
modes with ``register_dispatch_mode``. Dispatch functions never touch Ray: the group
puts shared arguments into the object store and calls the actors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from flowrl.batch import Batch
from flowrl.controller.future import DataFuture

Call = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) for one rank
F = TypeVar("F", bound=Callable[..., Any])


class Dispatch(StrEnum):
    ONE_TO_ALL = "ONE_TO_ALL"  # same arguments to every rank; list of results
    ALL_TO_ALL = "ALL_TO_ALL"  # each argument is a list, element i to rank i; list of results
    RANK_ZERO = "RANK_ZERO"  # only rank 0 runs; its result
    DP_COMPUTE = "DP_COMPUTE"  # Batches split over DP shards; Batch results concatenated
    DP_ALL_RANKS = "DP_ALL_RANKS"  # as DP_COMPUTE, but every rank its own shard (dispatch_info ignored)


class Execute(StrEnum):
    ALL = "ALL"  # every rank the dispatch plan names runs
    RANK_ZERO = "RANK_ZERO"  # only rank 0 runs, with its planned arguments; its result is returned


class DispatchInfo(NamedTuple):
    """What a worker says about its place in data parallelism (``Worker.dispatch_info``)."""

    dp_rank: int  # which DP shard this rank works on
    dp_size: int  # how many DP shards the group has
    is_collect: bool  # whether this rank's output stands for its shard


@dataclass(frozen=True)
class DPLayout:
    """The data-parallel layout of a group, built from every rank's ``DispatchInfo``."""

    dp_size: int
    dp_ranks: tuple[int, ...]  # dp_ranks[rank]: the shard that rank works on
    collect_ranks: tuple[int, ...]  # collect_ranks[shard]: the rank whose output is kept

    @classmethod
    def plain(cls, world_size: int) -> DPLayout:
        """Every rank its own shard (no tensor-parallel replicas)."""
        ranks = tuple(range(world_size))
        return cls(world_size, ranks, ranks)

    @classmethod
    def from_infos(cls, infos: Sequence[DispatchInfo], where: str) -> DPLayout:
        sizes = sorted({info.dp_size for info in infos})
        if len(sizes) != 1:
            raise ValueError(f"{where}: ranks disagree on dp_size: {[i.dp_size for i in infos]}")
        dp_size = sizes[0]
        out_of_range = {r: i.dp_rank for r, i in enumerate(infos) if not 0 <= i.dp_rank < dp_size}
        if out_of_range:
            raise ValueError(f"{where}: dp_rank outside [0, {dp_size}) on ranks {out_of_range}")
        collectors: dict[int, list[int]] = {d: [] for d in range(dp_size)}
        for rank, info in enumerate(infos):
            if info.is_collect:
                collectors[info.dp_rank].append(rank)
        wrong = {d: ranks for d, ranks in collectors.items() if len(ranks) != 1}
        if wrong:
            raise ValueError(
                f"{where}: each DP shard needs exactly one collected rank, got {{shard: ranks}} = {wrong}; "
                "make dispatch_info() return is_collect=True on one rank per dp_rank"
            )
        dp_ranks = tuple(info.dp_rank for info in infos)
        return cls(dp_size, dp_ranks, tuple(collectors[d][0] for d in range(dp_size)))


class Layout:
    """What a dispatch function may ask about the group: its size and its DP layout.

    The DP layout costs one round trip to the workers, so it is asked on first use only
    and then cached: ``dispatch_info()`` must not change after that.
    """

    def __init__(self, world_size: int, query_dp: Callable[[], DPLayout] | None = None) -> None:
        self.world_size = world_size
        self._query_dp = query_dp
        self._dp: DPLayout | None = None

    @property
    def dp(self) -> DPLayout:
        if self._dp is None:
            self._dp = self._query_dp() if self._query_dp else DPLayout.plain(self.world_size)
        return self._dp


class Plan(NamedTuple):
    calls: dict[int, Call]  # rank -> (args, kwargs); ranks left out are not called
    context: Any = None  # handed to the collect function


DispatchFn = Callable[[Layout, tuple[Any, ...], dict[str, Any]], Plan]
CollectFn = Callable[[Layout, dict[int, Any], Any], Any]


@dataclass(frozen=True)
class DispatchMode:
    name: str
    dispatch: DispatchFn
    collect: CollectFn
    # The group resolves DataFuture arguments to their values before dispatch, unless the
    # mode takes them as they are (DP_COMPUTE forwards their per-rank ObjectRefs).
    takes_futures: bool = False


_MODES: dict[str, DispatchMode] = {}


def register_dispatch_mode(
    name: str, dispatch_fn: DispatchFn, collect_fn: CollectFn, *, takes_futures: bool = False
) -> None:
    """Add a dispatch mode usable as ``@register(name)``. Names are unique."""
    name = str(name)
    if name in _MODES:
        raise ValueError(f"dispatch mode {name!r} is already registered; pick another name")
    _MODES[name] = DispatchMode(name, dispatch_fn, collect_fn, takes_futures)


def get_dispatch_mode(name: str) -> DispatchMode:
    try:
        return _MODES[str(name)]
    except KeyError:
        raise KeyError(
            f"no dispatch mode {str(name)!r}; known: {sorted(_MODES)}. Add one with register_dispatch_mode()"
        ) from None


# ---- @register ----------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    dispatch: str
    execute: Execute = Execute.ALL
    blocking: bool = True  # False: the group method returns a DataFuture


_SPEC_ATTR = "__flowrl_method__"


def register(
    dispatch: str | Callable[..., Any] = Dispatch.ONE_TO_ALL,
    execute: str = Execute.ALL,
    blocking: bool = True,
) -> Any:
    """Mark a Worker method as a group method: ``@register(Dispatch.DP_COMPUTE, blocking=False)``."""
    if callable(dispatch):  # bare @register
        return register()(dispatch)
    spec = MethodSpec(str(dispatch), Execute(execute), blocking)

    def mark(fn: F) -> F:
        setattr(fn, _SPEC_ATTR, spec)
        return fn

    return mark


def registered_methods(cls: type) -> dict[str, MethodSpec]:
    """The group methods of a worker class (overrides without ``@register`` drop out)."""
    found = {}
    for name in dir(cls):
        spec = getattr(inspect.getattr_static(cls, name), _SPEC_ATTR, None)
        if isinstance(spec, MethodSpec):
            found[name] = spec
    return found


# ---- built-in modes -------------------------------------------------------------------
def dispatch_one_to_all(layout: Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    return Plan({rank: (args, kwargs) for rank in range(layout.world_size)})


def collect_list(layout: Layout, outputs: dict[int, Any], context: Any) -> list[Any]:
    return [outputs[rank] for rank in sorted(outputs)]


def dispatch_all_to_all(layout: Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    n = layout.world_size
    for name, value in [*enumerate(args), *kwargs.items()]:
        if not isinstance(value, list | tuple) or len(value) != n:
            got = (
                f"{type(value).__name__} of length {len(value)}" if hasattr(value, "__len__") else repr(value)
            )
            raise ValueError(
                f"ALL_TO_ALL: argument {name!r} must be a list of {n} values (one per rank), got {got}"
            )
    calls = {r: (tuple(a[r] for a in args), {k: v[r] for k, v in kwargs.items()}) for r in range(n)}
    return Plan(calls)


def dispatch_rank_zero(layout: Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    return Plan({0: (args, kwargs)})


def collect_rank_zero(layout: Layout, outputs: dict[int, Any], context: Any) -> Any:
    return outputs[0]


@dataclass(frozen=True)
class DPContext:
    """What DP_COMPUTE's collect needs: the layout used and the padding to strip."""

    layout: DPLayout
    pad: int = 0  # rows appended so the Batch splits evenly
    length: int | None = None  # rows of the Batch arguments before padding; None: no Batch argument

    @property
    def shard_len(self) -> int | None:
        return None if self.length is None else (self.length + self.pad) // self.layout.dp_size


class _Split(NamedTuple):
    shards: list[Any]  # per DP shard: a Batch, or an ObjectRef to one
    pad: int
    length: int | None


def _split_batch(batch: Batch, dp_size: int) -> _Split:
    padded, pad = batch.pad_to_multiple(dp_size)
    return _Split(padded.chunk(dp_size), pad, len(batch))


def forwardable_shards(future: DataFuture, dp: DPLayout) -> list[Any] | None:
    """Per-shard ObjectRefs of a DP_COMPUTE future, if its DP size matches ``dp``; else None."""
    ctx = future.context
    if not isinstance(ctx, DPContext) or ctx.layout.dp_size != dp.dp_size:
        return None
    return [future.refs[rank] for rank in ctx.layout.collect_ranks]


def _split_value(value: Any, dp: DPLayout, forward: bool) -> tuple[_Split | None, Any]:
    """(split, value): a split for Batches and matching futures, else the value to broadcast."""
    if isinstance(value, DataFuture):
        shards = forwardable_shards(value, dp) if forward else None
        if shards is not None:
            return _Split(shards, value.context.pad, value.context.length), value
        value = value.get()  # layouts differ: materialize, then split again below
    if isinstance(value, Batch):
        return _split_batch(value, dp.dp_size), value
    return None, value


def _split_all(dp: DPLayout, values: dict[Any, Any]) -> tuple[dict[Any, _Split], dict[Any, Any]]:
    splits, plain = {}, {}
    for name, value in values.items():
        split, plain[name] = _split_value(value, dp, forward=True)
        if split is not None:
            splits[name] = split
    if len(splits) > 1:  # a forwarded future of unknown length cannot be checked against the rest
        for name in [n for n, s in splits.items() if s.length is None]:
            split, plain[name] = _split_value(values[name], dp, forward=False)
            if split is None:
                del splits[name]  # not a Batch after all: broadcast it
            else:
                splits[name] = split
    lengths = {name: s.length for name, s in splits.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            "DP_COMPUTE: the Batch arguments are split together, so their lengths must be equal; "
            f"got {lengths}"
        )
    return splits, plain


def dispatch_dp_compute(layout: Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    return _dispatch_dp(layout.dp, args, kwargs)


def dispatch_dp_all_ranks(layout: Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    """DP_COMPUTE over every rank, whatever ``dispatch_info`` says.

    For a hybrid worker whose trainer shards data over all N ranks while its rollout
    engine forms tensor-parallel replicas (``dispatch_info`` describes those): training
    methods use this mode, ``generate`` uses DP_COMPUTE.
    """
    return _dispatch_dp(DPLayout.plain(layout.world_size), args, kwargs)


def _dispatch_dp(dp: DPLayout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Plan:
    values: dict[Any, Any] = {**dict(enumerate(args)), **kwargs}
    splits, plain = _split_all(dp, values)
    calls: dict[int, Call] = {}
    for rank, shard in enumerate(dp.dp_ranks):
        per_rank = {name: splits[name].shards[shard] if name in splits else plain[name] for name in values}
        calls[rank] = (tuple(per_rank[i] for i in range(len(args))), {k: per_rank[k] for k in kwargs})
    first = next(iter(splits.values()), None)
    context = DPContext(dp, first.pad, first.length) if first else DPContext(dp)
    return Plan(calls, context)


def collect_dp_compute(layout: Layout, outputs: dict[int, Any], context: DPContext) -> Any:
    kept = [outputs[rank] for rank in context.layout.collect_ranks]  # in shard order
    if not kept or not all(isinstance(out, Batch) for out in kept):
        return kept
    if context.pad:
        want = context.shard_len
        wrong = {d: len(out) for d, out in enumerate(kept) if len(out) != want}
        if wrong:
            raise ValueError(
                f"DP_COMPUTE: the batch was padded by {context.pad} rows to split into {len(kept)} shards of "
                f"{want}, but shards {list(wrong)} came back with {list(wrong.values())} rows, so the "
                "padding cannot be stripped; return one row per input row, or send a batch size divisible "
                "by dp_size"
            )
    return Batch.concat(kept).unpad(context.pad)


register_dispatch_mode(Dispatch.ONE_TO_ALL, dispatch_one_to_all, collect_list)
register_dispatch_mode(Dispatch.ALL_TO_ALL, dispatch_all_to_all, collect_list)
register_dispatch_mode(Dispatch.RANK_ZERO, dispatch_rank_zero, collect_rank_zero)
register_dispatch_mode(Dispatch.DP_COMPUTE, dispatch_dp_compute, collect_dp_compute, takes_futures=True)
register_dispatch_mode(Dispatch.DP_ALL_RANKS, dispatch_dp_all_ranks, collect_dp_compute, takes_futures=True)


def as_dispatch_info(value: Any, where: str) -> DispatchInfo:
    """Accept a DispatchInfo or a plain (dp_rank, dp_size, is_collect) tuple from a worker."""
    if isinstance(value, Sequence) and len(value) == 3:
        return DispatchInfo(int(value[0]), int(value[1]), bool(value[2]))
    raise TypeError(f"{where}: dispatch_info() must return (dp_rank, dp_size, is_collect), got {value!r}")
