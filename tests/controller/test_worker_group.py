"""Worker groups on a real local Ray cluster: every dispatch mode, TP replicas, colocation, futures.

Workers tag what they return with their rank, so each expectation below says which rank
must have produced which row.
"""

import os
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.controller import (
    Dispatch,
    DispatchInfo,
    Execute,
    Plan,
    ResourcePool,
    Worker,
    WorkerGroup,
    init_ray,
    register,
    register_dispatch_mode,
)
from flowrl.keys import Keys

# Process-wide state: colocated roles live in one process, so they share this module's globals.
SHARED: dict[str, str] = {}


def dispatch_strided(layout, args, kwargs):
    """A user-defined mode: items[r::world] to rank r (a list argument of any length)."""
    (items,) = args
    n = layout.world_size
    return Plan({r: ((items[r::n],), kwargs) for r in range(n)}, context=len(items))


def collect_strided(layout, outputs, length):
    merged = [None] * length
    for r, part in outputs.items():
        merged[r :: layout.world_size] = part
    return merged


register_dispatch_mode("STRIDED", dispatch_strided, collect_strided)


def tag_rows(batch: Batch, rank: int, scale: float) -> Batch:
    return Batch(
        {Keys.SCORES: batch[Keys.SCORES] * scale},
        {Keys.WORKER_TAG: [f"rank{rank}"] * len(batch)},
    )


class TagWorker(Worker):
    def __init__(self, greeting: str = "hi") -> None:
        self.greeting = greeting
        self.calls: dict[str, int] = {}
        self.seen: list[float] = []

    def count(self, name: str) -> int:  # not registered: reached through execute_all
        return self.calls.get(name, 0)

    def last_seen(self) -> list[float]:
        return self.seen

    def _note(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @register(Dispatch.ONE_TO_ALL)
    def whoami(self, x: int) -> dict:
        return {
            "rank": self.rank,
            "world": self.world_size,
            "local_rank": self.local_rank,
            "x": x,
            "greeting": self.greeting,
            "pid": os.getpid(),
            "master": (self.master_addr, self.master_port),
            "env": (os.environ.get("FLOWRL_TEST_COLOR"), torch.get_num_threads()),
        }

    @register(Dispatch.ALL_TO_ALL)
    def scatter(self, x: int, *, y: str) -> str:
        return f"rank{self.rank}:{x}:{y}"

    @register(Dispatch.RANK_ZERO)
    def only_rank_zero(self) -> int:
        self._note("only_rank_zero")
        return self.rank

    @register(Dispatch.ONE_TO_ALL, execute=Execute.RANK_ZERO)
    def report(self) -> str:
        self._note("report")
        return f"report from rank{self.rank}"

    @register(Dispatch.DP_COMPUTE)
    def tag(self, batch: Batch, scale: float) -> Batch:
        self.seen = batch[Keys.SCORES].tolist()
        return tag_rows(batch, self.rank, scale)

    @register(Dispatch.DP_COMPUTE, blocking=False)
    def tag_later(self, batch: Batch, scale: float) -> Batch:
        return tag_rows(batch, self.rank, scale)

    @register(Dispatch.DP_COMPUTE)
    def shard_size(self, batch: Batch) -> dict:
        return {"rank": self.rank, "rows": len(batch)}

    @register("STRIDED")
    def upper(self, words: list[str]) -> list[str]:
        return [f"{w.upper()}@{self.rank}" for w in words]

    @register(Dispatch.ONE_TO_ALL)
    def all_reduce(self, value: float) -> float:
        self.init_distributed()
        t = torch.tensor([value * (self.rank + 1)])
        dist.all_reduce(t)
        return t.item()

    @register(Dispatch.ONE_TO_ALL)
    def remember(self, text: str) -> int:
        SHARED["note"] = f"{text} from rank{self.rank}"
        return os.getpid()


class TPWorker(Worker):
    """Ranks [k*tp, (k+1)*tp) are tensor-parallel replicas of DP shard k; the first is collected."""

    def __init__(self, tp: int) -> None:
        self.tp = tp
        self.seen: list[float] = []

    def dispatch_info(self) -> DispatchInfo:
        return DispatchInfo(self.rank // self.tp, self.world_size // self.tp, self.rank % self.tp == 0)

    def last_seen(self) -> list[float]:
        return self.seen

    @register(Dispatch.DP_COMPUTE)
    def tag(self, batch: Batch, scale: float) -> Batch:
        self.seen = batch[Keys.SCORES].tolist()
        return tag_rows(batch, self.rank, scale)

    @register(Dispatch.DP_COMPUTE, blocking=False)
    def tag_later(self, batch: Batch, scale: float) -> Batch:
        return tag_rows(batch, self.rank, scale)

    @register(Dispatch.ONE_TO_ALL)
    def recall(self) -> tuple[int, str, bool]:
        return os.getpid(), SHARED.get("note", ""), dist.is_initialized()

    @register(Dispatch.ONE_TO_ALL)
    def all_reduce_rank(self) -> float:
        self.init_distributed()  # a no-op: the colocated TagWorker role already joined this world
        t = torch.tensor([float(self.rank)])
        dist.all_reduce(t)
        return t.item()


def scores(n: int) -> Batch:
    return Batch({Keys.SCORES: torch.arange(n).float()})


@pytest.fixture(scope="module")
def cluster():
    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(cluster):
    """Two ranks, half a CPU each."""
    pool = ResourcePool(2, num_cpus_per_bundle=0.5)
    env = {"FLOWRL_TEST_COLOR": "green", "OMP_NUM_THREADS": "2"}
    return WorkerGroup(pool, TagWorker, kwargs={"greeting": "hello"}, env=env)


@pytest.fixture(scope="module")
def quad(cluster):
    """Four processes, each holding a TPWorker (tp=2, so dp=2) and a TagWorker (dp=4)."""
    pool = ResourcePool(4, num_cpus_per_bundle=0.5)
    return WorkerGroup.colocated(pool, {"tp": (TPWorker, (2,)), "dp": TagWorker})


def test_one_to_all_reaches_every_rank_with_its_env(pair):
    out = pair.whoami(7)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["x"] == 7 and o["greeting"] == "hello" for o in out)
    assert [o["local_rank"] for o in out] == [0, 1]  # one node
    assert out[0]["master"] == out[1]["master"] and out[0]["master"][1] > 0
    assert out[0]["pid"] != out[1]["pid"] and [o["pid"] for o in out] == pair.pids
    assert [o["env"] for o in out] == [("green", 2), ("green", 2)]  # env= of the group, threads applied
    assert pair.world_size == 2


def test_all_to_all_rank_zero_and_execute_rank_zero(pair):
    assert pair.scatter([10, 11], y=["a", "b"]) == ["rank0:10:a", "rank1:11:b"]
    assert pair.only_rank_zero() == 0
    assert pair.report() == "report from rank0"
    assert pair.execute_all("count", "only_rank_zero") == [1, 0]
    assert pair.execute_all("count", "report") == [1, 0]


def test_dp_compute_pads_an_uneven_batch_and_strips_the_padding(pair):
    out = pair.tag(scores(5), 10.0)
    # 5 rows + 1 padding row: rank 0 gets rows 0-2, rank 1 rows 3, 4 and a copy of row 0
    assert out[Keys.WORKER_TAG] == ["rank0"] * 3 + ["rank1"] * 2
    assert out[Keys.SCORES].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert pair.execute_all("last_seen") == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0]]
    assert pair.shard_size(scores(5)) == [{"rank": 0, "rows": 3}, {"rank": 1, "rows": 3}]


def test_user_defined_mode(pair):
    assert pair.upper(["a", "b", "c", "d", "e"]) == ["A@0", "B@1", "C@0", "D@1", "E@0"]


def test_torch_distributed_all_reduce_over_two_cpu_ranks(pair):
    assert pair.all_reduce(1.5) == [4.5, 4.5]  # 1.5 * 1 + 1.5 * 2 on both ranks


def test_tensor_parallel_replicas_share_a_shard_and_one_is_collected(quad):
    tp = quad["tp"]
    out = tp.tag(scores(5), 1.0)
    assert out[Keys.WORKER_TAG] == ["rank0"] * 3 + ["rank2"] * 2  # ranks 1 and 3 are not collected
    assert out[Keys.SCORES].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert tp.execute_all("last_seen") == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [3.0, 4.0, 0.0], [3.0, 4.0, 0.0]]


def test_colocated_roles_share_one_process(quad):
    pids = quad["dp"].remember("written by the dp role")
    recalled = quad["tp"].recall()
    assert pids == quad["dp"].pids == quad["tp"].pids and len(set(pids)) == 4
    assert [r[0] for r in recalled] == pids
    assert [r[1] for r in recalled] == [f"written by the dp role from rank{r}" for r in range(4)]
    # one torch.distributed world per process: the dp role joins, the tp role reuses it
    assert quad["dp"].all_reduce(1.0) == [10.0] * 4
    assert [r[2] for r in quad["tp"].recall()] == [True] * 4
    assert quad["tp"].all_reduce_rank() == [6.0] * 4


def test_future_is_forwarded_between_groups_with_the_same_dp_size(pair, quad):
    future = pair.tag_later(scores(5), 2.0)  # dp=2: rows 0-2 on rank 0, 3-4 (+pad) on rank 1
    out = quad["tp"].tag(future, 0.5)  # dp=2 as well: shard k goes to ranks 2k and 2k+1
    assert not future.materialized  # the driver never fetched the producer's output
    assert out[Keys.SCORES].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert out[Keys.WORKER_TAG] == ["rank0"] * 3 + ["rank2"] * 2
    assert quad["tp"].execute_all("last_seen")[2] == [6.0, 8.0, 0.0]  # the padded shard, as rank 1 made it
    # chained without blocking at all, then materialized at the end
    final = quad["tp"].tag_later(pair.tag_later(scores(4), 3.0), 1.0)
    assert final.get()[Keys.SCORES].tolist() == [0.0, 3.0, 6.0, 9.0] and final.materialized
    assert future.get()[Keys.WORKER_TAG] == ["rank0"] * 3 + ["rank1"] * 2 and future.materialized


def test_future_is_materialized_and_split_again_when_dp_sizes_differ(pair, quad):
    future = pair.tag_later(scores(6), 1.0)  # dp=2
    out = quad["dp"].tag(future, 1.0)  # dp=4: the rows must be re-split 2+2+1+1 -> pad to 8
    assert future.materialized
    assert out[Keys.WORKER_TAG] == ["rank0", "rank0", "rank1", "rank1", "rank2", "rank2"]
    assert out[Keys.SCORES].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def doc_example() -> tuple[str, str]:
    """The worker and driver blocks of docs/architecture.md's example, as written there."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    blocks = []
    for marker in ("<!-- example: worker -->", "<!-- example: driver -->"):
        blocks.append(text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0])
    return blocks[0], blocks[1]


def test_the_architecture_doc_example_runs_as_written(cluster, capsys):
    worker, driver = doc_example()
    # response lengths 2, 1, 3, 0, 2 plus the 0.5 bonus; 5 rows + 1 padding row seen in all
    expected = "[2.5, 1.5, 3.5, 0.5, 2.5] [6.0, 6.0]"
    assert f"# {expected}" in driver
    namespace = {"__name__": "architecture_example"}
    code = compile(worker + driver, "docs/architecture.md", "exec")
    exec(code, namespace)  # noqa: S102 - the doc's own example, run as written
    try:
        assert expected in capsys.readouterr().out.splitlines()
    finally:
        namespace["scorers"].shutdown()
        namespace["scorers"].pool.shutdown()
