"""Checkpoint layout, atomicity, retention and the driver side of resume (no Ray: fake worker groups)."""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flowrl.engines import rng
from flowrl.trainer import checkpoint as ck
from flowrl.algos.kl import AdaptiveKLController
from flowrl.config import load_config
from flowrl.data.sampler import PromptSampler


def _complete(root, step, pointer=True):
    path = root / ck.step_name(step)
    path.mkdir(parents=True)
    (path / ck.DRIVER_STATE).write_text(json.dumps({"step": step}))
    if pointer:
        (root / ck.LATEST).write_text(ck.step_name(step) + "\n")
    return path


def test_only_complete_checkpoints_count(tmp_path):
    _complete(tmp_path, 2)
    _complete(tmp_path, 10)
    (tmp_path / "step_00000012").mkdir()  # renamed but no driver.json: never loaded
    (tmp_path / "step_00000014.tmp").mkdir()  # a save killed before the rename
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [2, 10]
    assert ck.find_latest(tmp_path).step == 10
    assert ck.remove_partial(tmp_path) == ["step_00000014.tmp"]
    assert not (tmp_path / "step_00000014.tmp").exists()


def test_latest_pointer_wins_and_a_stale_pointer_falls_back(tmp_path):
    _complete(tmp_path, 4)
    _complete(tmp_path, 6, pointer=False)  # killed after the rename, before the pointer update
    (tmp_path / ck.LATEST).write_text("step_00000004\n")
    assert ck.find_latest(tmp_path).step == 4  # the pointer names a complete checkpoint: use it
    (tmp_path / ck.LATEST).write_text("step_00000008\n")  # names one that is gone
    assert ck.find_latest(tmp_path).step == 6
    assert ck.find_latest(tmp_path / "nothing") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _complete(tmp_path, step)
    removed = ck.prune(tmp_path, keep_last=2)
    assert sorted(os.path.basename(p) for p in removed) == ["step_00000001", "step_00000002"]
    assert [c.step for c in ck.list_checkpoints(tmp_path)] == [3, 4]


def test_read_checkpoint_errors_name_the_folder(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"trainer.resume=.*nope: no such folder"):
        ck.read_checkpoint(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ck.CheckpointError, match=r"half: not a complete checkpoint"):
        ck.read_checkpoint(tmp_path / "half")


def test_rng_states_round_trip_bitwise(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    rng.save_rng(tmp_path / "rng" / "rank0.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    rng.load_rng(tmp_path / "rng" / "rank0.pt")
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    with pytest.raises(rng.RNGStateError, match="rank5.pt: missing RNG state"):
        rng.load_rng(tmp_path / "rng" / "rank5.pt")


def test_rng_state_with_cached_gaussians_round_trips(tmp_path):
    np.random.seed(4), random.seed(5)
    np.random.randn(), random.gauss(0.0, 1.0)  # both generators now hold a cached second normal
    rng.save_rng(tmp_path / "r.pt")
    expected = (np.random.randn(3), [random.gauss(0.0, 1.0) for _ in range(3)])
    np.random.seed(0), random.seed(0)
    rng.load_rng(tmp_path / "r.pt")
    assert np.array_equal(np.random.randn(3), expected[0]) and [random.gauss(0.0, 1.0) for _ in range(3)] == expected[1]


class _Payload:
    """Unpickling this runs code: what a tampered checkpoint file could carry."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_tampered_rng_file_with_a_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng.save_rng(tmp_path / "r.pt")
    state = torch.load(tmp_path / "r.pt", weights_only=True)
    state["python"]["gauss_next"] = _Payload()
    torch.save(state, tmp_path / "r.pt")  # a file that would run `touch PWNED` if unpickled freely
    with pytest.raises(rng.RNGStateError, match="r.pt: not an RNG state written by flowrl"):
        rng.load_rng(tmp_path / "r.pt")
    assert not (tmp_path / "PWNED").exists()


class FakeGroup:
    """Stands in for a worker group: ``save`` writes a file the way DCP writes a folder."""

    def __init__(self):
        self.weights = 0.0
        self.loaded = None

    def save(self, path):
        os.makedirs(path)
        with open(os.path.join(path, "shard"), "w") as f:
            f.write(str(self.weights))

    def load(self, path):
        with open(os.path.join(path, "shard")) as f:
            self.weights = float(f.read())
        self.loaded = path

    def save_rng_state(self, checkpoint):
        rng.save_rng(rng.worker_rng_path(checkpoint, 0))

    def load_rng_state(self, checkpoint):
        rng.load_rng(rng.worker_rng_path(checkpoint, 0))


def _runtime(tmp_path, *overrides):
    cfg = load_config(
        None,
        [f"trainer.run_dir={tmp_path}", "actor.model.path=m", "data.train_files=[x.jsonl]", "rollout.n=2",
         *overrides],
    )
    loader = SimpleNamespace(sampler=PromptSampler(10, 3, seed=5))
    loader.state_dict = loader.sampler.state_dict
    loader.load_state_dict = loader.sampler.load_state_dict
    return SimpleNamespace(cfg=cfg, actor=FakeGroup(), critic=None, train_data=loader)


def test_save_then_resume_restores_driver_state_and_truncates_metrics(tmp_path):
    rt = _runtime(tmp_path, "trainer.keep_last=2")
    kl = AdaptiveKLController(0.1, target_kl=1.0, horizon=10)
    metrics = tmp_path / "metrics.jsonl"
    saver = ck.Checkpointer(rt, {"kl": kl})
    for step in (1, 2, 3):
        rt.actor.weights = float(step)
        rt.train_data.sampler.next_indices()
        kl.update(2.0, n_steps=1)
        with open(metrics, "a") as f:
            f.write(json.dumps({"step": step}) + "\n")
        saver.save(step)
    assert [c.step for c in ck.list_checkpoints(tmp_path / "checkpoints")] == [2, 3]  # keep_last=2
    expected_kl, expected_sampler = kl.value, rt.train_data.sampler.state_dict()
    with open(metrics, "a") as f:  # step 4 ran, then the driver was killed before saving it
        f.write(json.dumps({"step": 4}) + "\n")

    rt2 = _runtime(tmp_path, "trainer.resume=auto")
    kl2 = AdaptiveKLController(0.1, target_kl=1.0, horizon=10)
    assert ck.Checkpointer(rt2, {"kl": kl2}).resume() == 3
    assert rt2.actor.weights == 3.0 and rt2.actor.loaded.endswith("step_00000003/actor")
    assert kl2.value == expected_kl == pytest.approx(0.1 * 1.02**3)
    assert rt2.train_data.sampler.state_dict() == expected_sampler == {"epoch": 0, "position": 9, "seed": 5, "n_rows": 10}
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_resume_auto_without_checkpoint_starts_at_zero_and_disable_ignores_them(tmp_path):
    assert ck.Checkpointer(_runtime(tmp_path, "trainer.resume=auto")).resume() == 0
    ck.Checkpointer(_runtime(tmp_path)).save(1)
    assert ck.Checkpointer(_runtime(tmp_path, "trainer.resume=disable")).resume() == 0


def test_resume_refuses_a_differently_shaped_run(tmp_path):
    ck.Checkpointer(_runtime(tmp_path, "trainer.num_workers=1")).save(1)
    with pytest.raises(ck.CheckpointError, match=r"trainer.num_workers=1, this run has trainer.num_workers=2; "
                       r"resume with trainer.num_workers=1"):
        ck.Checkpointer(_runtime(tmp_path, "trainer.resume=auto", "trainer.num_workers=2")).resume()


def test_a_save_killed_before_the_rename_leaves_the_previous_checkpoint_loadable(tmp_path):
    rt = _runtime(tmp_path)
    saver = ck.Checkpointer(rt)
    saver.save(1)
    def die(path):
        raise KeyboardInterrupt  # the process is stopped in the middle of the save

    rt.actor.save_rng_state = die
    with pytest.raises(KeyboardInterrupt):
        saver.save(2)
    root = tmp_path / "checkpoints"
    assert (root / "step_00000002.tmp").is_dir() and ck.find_latest(root).step == 1
    assert ck.Checkpointer(_runtime(tmp_path, "trainer.resume=auto")).resume() == 1
    assert not (root / "step_00000002.tmp").exists()  # cleaned up by the next run


@pytest.mark.parametrize(
    "save_every, total, saved",
    [(0, 5, [5]), (2, 5, [2, 4, 5]), (-1, 5, []), (1, 3, [1, 2, 3])],
)
def test_save_schedule(tmp_path, save_every, total, saved):
    rt = _runtime(tmp_path, f"trainer.save_every={save_every}", f"trainer.total_steps={total}")
    assert [s for s in range(1, total + 1) if ck.Checkpointer(rt).due(s)] == saved


def test_a_fresh_run_replaces_an_earlier_runs_checkpoint_of_the_same_step(tmp_path):
    old = _runtime(tmp_path)
    old.actor.weights = 7.0
    ck.Checkpointer(old).save(1)
    new = _runtime(tmp_path)  # resume=disable: a new run in the same folder
    new.actor.weights = 1.0
    ck.Checkpointer(new).save(1)
    loader = _runtime(tmp_path, "trainer.resume=auto")
    assert ck.Checkpointer(loader).resume() == 1 and loader.actor.weights == 1.0


def _dcp_folder(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(4, 3)
    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "engine": {"global_step": 3}}, checkpoint_id=str(folder))
    return folder


def test_dcp_metadata_of_a_real_checkpoint_passes_and_a_pickle_payload_is_refused(tmp_path, monkeypatch):
    import pickle

    from flowrl.engines.dcp_safety import UnsafeCheckpointError, check_dcp_metadata

    folder = _dcp_folder(tmp_path)
    check_dcp_metadata(folder)  # what torch.distributed.checkpoint writes is allowed
    monkeypatch.chdir(tmp_path)
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload()))  # would run `touch PWNED` in pickle.load
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refused to load it: it asks to unpickle posix.system"):
        check_dcp_metadata(folder)
    assert not (tmp_path / "PWNED").exists()


def test_a_lora_resume_keeps_the_dtype_its_adapter_only_checkpoints_assume_for_the_base(tmp_path):
    pytest.importorskip("peft", reason="LoRA configs load only where peft is installed")
    lora = ("actor.lora.rank=4", "actor.lora.alpha=8")
    ck.Checkpointer(_runtime(tmp_path, *lora, "rollout.dtype=float32")).save(1)
    with pytest.raises(ck.CheckpointError, match=r"rollout.dtype=float32, this run has rollout.dtype=bfloat16"):
        ck.Checkpointer(_runtime(tmp_path, "trainer.resume=auto", *lora, "rollout.dtype=bfloat16")).resume()
    assert ck.Checkpointer(_runtime(tmp_path, "trainer.resume=auto", *lora, "rollout.dtype=float32")).resume() == 1
