"""Dispatch and collect functions on their own: no Ray, hand-computed expectations."""

import pickle

import pytest
import torch

from flowrl.batch import Batch
from flowrl.controller import (
    DataFuture,
    Dispatch,
    DispatchInfo,
    DPContext,
    DPLayout,
    Execute,
    Layout,
    Worker,
    register,
)
from flowrl.controller.dispatch import (
    MethodSpec,
    get_dispatch_mode,
    register_dispatch_mode,
    registered_methods,
)
from flowrl.controller.worker_group import _role_spec
from flowrl.keys import Keys


def rows(n: int) -> Batch:
    return Batch({Keys.SCORES: torch.arange(n).float()}, {Keys.WORKER_TAG: [f"s{i}" for i in range(n)]})


def plan(mode: str, layout: Layout, *args, **kwargs):
    return get_dispatch_mode(mode).dispatch(layout, args, kwargs)


def collect(mode: str, layout: Layout, outputs: dict, context=None):
    return get_dispatch_mode(mode).collect(layout, outputs, context)


def test_one_to_all_and_rank_zero():
    layout = Layout(3)
    p = plan(Dispatch.ONE_TO_ALL, layout, 7, k="v")
    assert p.calls == {0: ((7,), {"k": "v"}), 1: ((7,), {"k": "v"}), 2: ((7,), {"k": "v"})}
    assert collect(Dispatch.ONE_TO_ALL, layout, {2: "c", 0: "a", 1: "b"}) == ["a", "b", "c"]
    p = plan(Dispatch.RANK_ZERO, layout, 7)
    assert p.calls == {0: ((7,), {})}
    assert collect(Dispatch.RANK_ZERO, layout, {0: "only"}) == "only"


def test_all_to_all_gives_element_i_to_rank_i():
    p = plan(Dispatch.ALL_TO_ALL, Layout(2), [10, 11], y=("a", "b"))
    assert p.calls == {0: ((10,), {"y": "a"}), 1: ((11,), {"y": "b"})}
    with pytest.raises(ValueError, match="argument 0 must be a list of 2 values.*length 3"):
        plan(Dispatch.ALL_TO_ALL, Layout(2), [1, 2, 3])
    with pytest.raises(ValueError, match="argument 'y' must be a list of 2"):
        plan(Dispatch.ALL_TO_ALL, Layout(2), [1, 2], y=5)


def test_dp_compute_pads_splits_and_strips():
    layout = Layout(2)
    p = plan(Dispatch.DP_COMPUTE, layout, rows(5), 2.0, extra=rows(5))
    (a0, _), (a1, k1) = p.calls[0], p.calls[1]
    # 5 rows padded with a copy of row 0 to 6, then 3 per rank; the float is broadcast
    assert a0[0][Keys.WORKER_TAG] == ["s0", "s1", "s2"] and a1[0][Keys.WORKER_TAG] == ["s3", "s4", "s0"]
    assert a0[1] == 2.0 and a1[1] == 2.0
    assert k1["extra"][Keys.SCORES].tolist() == [3.0, 4.0, 0.0]
    assert (p.context.pad, p.context.length, p.context.shard_len) == (1, 5, 3)
    out = collect(Dispatch.DP_COMPUTE, layout, {1: a1[0], 0: a0[0]}, p.context)
    assert out[Keys.WORKER_TAG] == ["s0", "s1", "s2", "s3", "s4"]
    # non-Batch results come back as a list in shard order
    assert collect(Dispatch.DP_COMPUTE, layout, {1: {"n": 3}, 0: {"n": 3}}, p.context) == [{"n": 3}, {"n": 3}]


def test_dp_compute_refuses_what_it_cannot_undo():
    layout = Layout(2)
    p = plan(Dispatch.DP_COMPUTE, layout, rows(5))
    with pytest.raises(ValueError, match="padded by 1 rows.*shards \\[1\\] came back with \\[2\\] rows"):
        collect(Dispatch.DP_COMPUTE, layout, {0: rows(3), 1: rows(2)}, p.context)
    with pytest.raises(ValueError, match="lengths must be equal"):
        plan(Dispatch.DP_COMPUTE, layout, rows(4), rows(6))


def tp_infos(world: int, tp: int) -> list[DispatchInfo]:
    return [DispatchInfo(r // tp, world // tp, r % tp == 0) for r in range(world)]


def test_tensor_parallel_replicas_get_the_same_shard_and_one_is_collected():
    dp = DPLayout.from_infos(tp_infos(4, 2), "test")
    assert dp == DPLayout(dp_size=2, dp_ranks=(0, 0, 1, 1), collect_ranks=(0, 2))
    layout = Layout(4, lambda: dp)
    p = plan(Dispatch.DP_COMPUTE, layout, rows(3))
    shards = [p.calls[r][0][0] for r in range(4)]
    assert shards[0] is shards[1] and shards[2] is shards[3]  # one object per shard, sent to both replicas
    assert shards[0][Keys.WORKER_TAG] == ["s0", "s1"] and shards[2][Keys.WORKER_TAG] == ["s2", "s0"]
    tagged = {r: Batch(non_tensors={Keys.WORKER_TAG: [f"rank{r}"] * 2}) for r in range(4)}
    out = collect(Dispatch.DP_COMPUTE, layout, tagged, p.context)
    assert out[Keys.WORKER_TAG] == ["rank0", "rank0", "rank2"]  # padding row stripped


def test_dp_all_ranks_ignores_tensor_parallel_replicas():
    # the same group as above (4 ranks, tp=2): a training method splits over all 4 ranks
    asked = []
    layout = Layout(4, lambda: asked.append(1) or DPLayout.from_infos(tp_infos(4, 2), "test"))
    p = plan(Dispatch.DP_ALL_RANKS, layout, rows(6), 0.5)
    assert [p.calls[r][0][0][Keys.WORKER_TAG] for r in range(4)] == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"], ["s0", "s1"]]
    assert [p.calls[r][0][1] for r in range(4)] == [0.5] * 4 and p.context.pad == 2
    tagged = {r: Batch(non_tensors={Keys.WORKER_TAG: [f"rank{r}"] * 2}) for r in range(4)}
    out = collect(Dispatch.DP_ALL_RANKS, layout, tagged, p.context)
    assert out[Keys.WORKER_TAG] == ["rank0", "rank0", "rank1", "rank1", "rank2", "rank2"]
    assert asked == []  # the workers' dispatch_info is never asked
    # a generate future (2 shards from ranks 0 and 2) is not forwarded to 4 shards: split again
    future, gathered = fake_future({0: rows(2), 2: rows(2)}, DPLayout.from_infos(tp_infos(4, 2), "g"), 0, 4)
    p = plan(Dispatch.DP_ALL_RANKS, layout, future)
    assert gathered == [[0, 2]] and [len(p.calls[r][0][0]) for r in range(4)] == [1, 1, 1, 1]


def test_dp_layout_is_asked_once():
    asked = []
    layout = Layout(2, lambda: asked.append(1) or DPLayout.plain(2))
    plan(Dispatch.DP_COMPUTE, layout, rows(2))
    plan(Dispatch.DP_COMPUTE, layout, rows(2))
    assert asked == [1]


def test_bad_dispatch_info_is_explained():
    with pytest.raises(ValueError, match="exactly one collected rank.*\\{1: \\[\\]\\}"):
        DPLayout.from_infos([DispatchInfo(0, 2, True), DispatchInfo(1, 2, False)], "W.dispatch_info")
    with pytest.raises(ValueError, match="disagree on dp_size"):
        DPLayout.from_infos([DispatchInfo(0, 2, True), DispatchInfo(0, 1, True)], "W.dispatch_info")
    with pytest.raises(ValueError, match="outside \\[0, 2\\) on ranks \\{1: 5\\}"):
        DPLayout.from_infos([DispatchInfo(0, 2, True), DispatchInfo(5, 2, True)], "W.dispatch_info")


class Base(Worker):
    @register(Dispatch.DP_COMPUTE, blocking=False)
    def generate(self, batch): ...

    @register
    def init_model(self): ...

    @register(Dispatch.RANK_ZERO)
    def save(self): ...


class Child(Base):
    def save(self): ...  # overridden without @register: no longer a group method

    @register(Dispatch.ONE_TO_ALL, execute=Execute.RANK_ZERO)
    def report(self): ...


def test_registered_methods_follow_overrides():
    found = registered_methods(Child)
    assert found == {
        "generate": MethodSpec("DP_COMPUTE", Execute.ALL, blocking=False),
        "init_model": MethodSpec("ONE_TO_ALL"),
        "report": MethodSpec("ONE_TO_ALL", Execute.RANK_ZERO),
    }


def test_user_modes_register_once_and_unknown_modes_fail_early():
    register_dispatch_mode("TEST_ONLY_MODE", lambda layout, a, k: None, lambda layout, o, c: None)
    with pytest.raises(ValueError, match="already registered"):
        register_dispatch_mode("TEST_ONLY_MODE", lambda layout, a, k: None, lambda layout, o, c: None)

    class Typo(Worker):
        @register("DP_COMPUTEE")
        def f(self): ...

    with pytest.raises(KeyError, match="Typo.f: no dispatch mode 'DP_COMPUTEE'"):
        _role_spec("typo", Typo)

    class Clash(Worker):
        @register
        def shutdown(self): ...

    with pytest.raises(ValueError, match="registers \\['shutdown'\\], which WorkerGroup itself uses"):
        _role_spec("clash", Clash)
    with pytest.raises(TypeError, match="must subclass flowrl.controller.Worker"):
        _role_spec("x", (dict, (), {}))


def fake_future(outputs: dict, dp: DPLayout, pad: int, length: int) -> tuple[DataFuture, list]:
    """A DP_COMPUTE future whose 'ObjectRefs' are strings; gather records that it was called."""
    gathered = []

    def gather(refs):
        gathered.append(sorted(refs))
        return outputs

    ctx = DPContext(dp, pad, length)
    producer = Layout(len(dp.dp_ranks), lambda: dp)
    future = DataFuture(
        {r: f"ref{r}" for r in outputs},
        lambda outs: collect(Dispatch.DP_COMPUTE, producer, outs, ctx),
        ctx,
        gather,
        "Producer.make",
    )
    return future, gathered


def test_futures_forward_per_shard_refs_when_dp_sizes_match():
    # producer: 4 ranks with tp=2, so shards come from ranks 0 and 2; 3 rows padded to 4
    producer_dp = DPLayout.from_infos(tp_infos(4, 2), "producer")
    shards = {r: rows(2) for r in range(4)}
    future, gathered = fake_future(shards, producer_dp, pad=1, length=3)
    p = plan(Dispatch.DP_COMPUTE, Layout(2), future, 1.0)
    assert [p.calls[r][0] for r in range(2)] == [("ref0", 1.0), ("ref2", 1.0)]
    assert (p.context.pad, p.context.length) == (1, 3) and gathered == [] and not future.materialized
    # a consumer with tp replicas sends each shard's ref to both replicas
    consumer = Layout(4, lambda: DPLayout.from_infos(tp_infos(4, 2), "consumer"))
    p = plan(Dispatch.DP_COMPUTE, consumer, future)
    assert [p.calls[r][0][0] for r in range(4)] == ["ref0", "ref0", "ref2", "ref2"]
    assert gathered == []


def test_futures_are_materialized_and_split_again_when_dp_sizes_differ():
    parts = {0: rows(3), 1: rows(3)[[0, 1, 0]]}  # 5 rows were padded by 1 on a dp=2 producer
    future, gathered = fake_future(parts, DPLayout.plain(2), pad=1, length=5)
    p = plan(Dispatch.DP_COMPUTE, Layout(3), future)
    assert gathered == [[0, 1]] and future.materialized
    assert [p.calls[r][0][0][Keys.SCORES].tolist() for r in range(3)] == [[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]
    assert p.context.pad == 1 and p.context.length == 5
    # ONE_TO_ALL never sees a future: the group resolves it first; a nested one cannot travel
    with pytest.raises(TypeError, match="Producer.make.*cannot be sent to a worker inside another object"):
        pickle.dumps([future])
