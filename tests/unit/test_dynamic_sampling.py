"""DAPO's dynamic sampling and soft overlong punishment (Yu et al. 2025, arXiv:2503.14476).

The pure functions are checked against loops written from the paper's definitions; the
refill loop of the controller (``sampling.fill_informative`` / ``steps.sample``) runs with a fake
generator and fake rewards over a real ``DataLoader``, so the sampler positions and seeds a
checkpoint would hold are the real ones.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flowrl.algos import informative_groups, overlong_penalty
from flowrl.batch import Batch
from flowrl.config import load_config
from flowrl.data import DataLoader
from flowrl.drivers import sampling, steps
from flowrl.keys import Keys
from flowrl.trainer.runtime import Runtime
from flowrl.trainer.tracking import Timer


# ---- overlong punishment -----------------------------------------------------------------------
def paper_overlong(length: int, l_max: int, l_cache: int) -> float:
    """DAPO eq. 13, as printed."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


@pytest.mark.parametrize("l_max, l_cache, factor", [(16, 4, 1.0), (16, 16, 1.0), (20, 1, 0.5), (8, 3, 2.0)])
def test_overlong_penalty_is_the_papers_equation(l_max, l_cache, factor):
    lengths = torch.arange(0, l_max + 4)  # [B] up to and past L_max
    got = overlong_penalty(lengths, l_max, l_cache, factor)
    want = torch.tensor([factor * paper_overlong(int(n), l_max, l_cache) for n in lengths])
    torch.testing.assert_close(got, want.float())
    assert got.dtype == torch.float32 and got[lengths == l_max].item() == -factor


def test_overlong_penalty_hand_values_and_a_bad_buffer():
    got = overlong_penalty(torch.tensor([12, 13, 14, 15, 16]), max_length=16, buffer=4)
    assert got.tolist() == [0.0, -0.25, -0.5, -0.75, -1.0]
    with pytest.raises(ValueError, match="buffer=0 must be in"):
        overlong_penalty(torch.tensor([1]), 16, 0)


# ---- which groups carry a signal ---------------------------------------------------------------
def test_informative_groups_by_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, float("nan"), 1.0, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    assert informative_groups(scores, groups).tolist() == [False, False, True, True, False, False, True, True, False]


@pytest.mark.parametrize("seed", range(4))
def test_informative_groups_equals_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.randint(0, 6, (40,), generator=g)  # not contiguous, any order
    scores = torch.randint(0, 2, (40,), generator=g).float() * 0.1  # many ties
    got = informative_groups(scores, group_ids)
    for i in range(40):
        members = [float(scores[j]) for j in range(40) if group_ids[j] == group_ids[i]]
        assert bool(got[i]) == (len(set(members)) > 1)


# ---- the refill loop with a fake generator ------------------------------------------------------
def _round(patterns: list[list[float]], width: int = 2) -> Batch:
    """A scored rollout: one group per pattern (its samples' scores), ``GROUP_IDS`` 0..G-1."""
    scores = torch.tensor([float(s) for p in patterns for s in p])  # [B]
    group_ids = torch.tensor([g for g, p in enumerate(patterns) for _ in p])  # [B]
    b = len(scores)
    batch = Batch(
        {
            Keys.SCORES: scores,
            Keys.GROUP_IDS: group_ids,
            Keys.PROMPT_IDS: torch.full((b, width), 7),
            Keys.PROMPT_MASK: torch.ones(b, width, dtype=torch.long),
            Keys.RESPONSE_MASK: torch.ones(b, 3),
        }
    )
    batch[Keys.PROMPT_TEXT] = [f"{p}" for p in patterns for _ in p]
    return batch


def _rounds(*batches: Batch):
    calls = iter(batches)
    return lambda: (b := next(calls), {
        "reward/score_mean": float(b[Keys.SCORES].mean()), "reward/errors": 1.0,
        "reward/max": float(b[Keys.SCORES].max()), "reward/min": float(b[Keys.SCORES].min()),
    })


def test_refill_keeps_informative_groups_until_the_batch_is_full():
    one, two, three = (
        _round([[1, 1], [0, 1], [0, 0]], width=2),  # 1 informative group of 3
        _round([[1, 0], [1, 1], [0.5, 0]], width=4),  # 2 more: the batch holds 3
        _round([[0, 1], [1, 0], [1, 0]], width=3),  # 3 more: 6 >= 4, cut to 4
    )
    batch, m = sampling.fill_informative(_rounds(one, two, three), groups=4, max_rounds=5)
    assert m["dynamic_sampling/rounds"] == 3 and m["dynamic_sampling/sampled_groups"] == 9
    assert m["dynamic_sampling/dropped_groups"] == 3 and m["dynamic_sampling/kept_groups"] == 4
    assert m["dynamic_sampling/short"] == 0.0
    assert batch[Keys.GROUP_IDS].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # contiguous, in the order sampled
    assert batch[Keys.SCORES].tolist() == [0, 1, 1, 0, 0.5, 0, 0, 1]
    assert batch[Keys.PROMPT_TEXT][:2] == ["[0, 1]"] * 2
    # prompts of different widths are left-padded to the widest (4) with mask 0
    assert batch[Keys.PROMPT_IDS].shape == (8, 4) and batch[Keys.PROMPT_MASK][:2].tolist() == [[0, 0, 1, 1]] * 2
    assert batch[Keys.PROMPT_MASK].sum(-1).tolist() == [2, 2, 4, 4, 4, 4, 3, 3]
    # the rounds' metrics: counts summed, means weighted by the rounds' sizes, extremes over rounds
    assert m["reward/errors"] == 3.0 and m["reward/max"] == 1.0 and m["reward/min"] == 0.0
    assert m["reward/score_mean"] == pytest.approx(float(torch.cat([one[Keys.SCORES], two[Keys.SCORES], three[Keys.SCORES]]).mean()))


def test_one_round_is_enough_when_every_group_varies():
    full = _round([[0, 1], [1, 0]])
    batch, m = sampling.fill_informative(_rounds(full), groups=2, max_rounds=3)
    assert m["dynamic_sampling/rounds"] == 1 and m["dynamic_sampling/dropped_groups"] == 0
    assert batch[Keys.SCORES].tolist() == full[Keys.SCORES].tolist()


def test_short_after_the_cap_trains_on_what_it_has_cut_to_the_ranks():
    patterns = ([[1, 1], [0, 1], [1, 0], [1, 1]], [[1, 1], [1, 1], [0, 1], [0, 0]])
    batch, m = sampling.fill_informative(_rounds(*map(_round, patterns)), groups=4, max_rounds=2, multiple=4)
    # 3 informative groups of 2 samples; 4 ranks split the batch: 2 groups (4 samples) are kept
    assert m["dynamic_sampling/short"] == 1.0 and m["dynamic_sampling/rounds"] == 2
    assert m["dynamic_sampling/kept_groups"] == 2 and len(batch) == 4
    assert batch[Keys.GROUP_IDS].tolist() == [0, 0, 1, 1]
    # 3 groups (6 samples) split evenly over 2 ranks: all of them are kept
    batch, _ = sampling.fill_informative(_rounds(*map(_round, patterns)), groups=4, max_rounds=2, multiple=2)
    assert len(batch) == 6 and batch[Keys.GROUP_IDS].tolist() == [0, 0, 1, 1, 2, 2]


def test_no_informative_group_within_the_cap_takes_the_first_round_as_sampled():
    first, second = _round([[1, 1], [0, 0]]), _round([[1, 1], [1, 1]])
    batch, m = sampling.fill_informative(_rounds(first, second), groups=2, max_rounds=2)
    assert m["dynamic_sampling/short"] == 1.0 and m["dynamic_sampling/kept_groups"] == 2
    assert batch[Keys.SCORES].tolist() == first[Keys.SCORES].tolist()


# ---- steps.sample over a real loader: rounds consume prompts, a resume continues exactly --------
class _Rows:
    """Prompt rows 0..n-1; row r's prompt has 1 + r % 3 tokens (so rounds differ in width), the
    last one r + 10. Rows with r % 3 == 0 are hard (scores vary), the others all-equal."""

    pad_id = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def collate(self, indices):
        width = 1 + max(r % 3 for r in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for i, r in enumerate(indices):
            ids[i, width - 1 - r % 3 :], mask[i, width - 1 - r % 3 :] = r + 10, 1
        batch = Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: mask})
        batch[Keys.DATA_SOURCE] = ["toy"] * len(indices)
        return batch


def _generate(prompts: Batch, n: int, temperature=None) -> Batch:
    out = prompts.repeat(n)
    out[Keys.RESPONSE_MASK] = torch.ones(len(out), 4)
    return out


def _score(batch: Batch) -> Batch:
    rows = batch[Keys.PROMPT_IDS][:, -1] - 10  # [B]
    varies = torch.arange(len(batch)) % 2 == 0  # [B] alternate samples of a group differ
    scores = torch.where((rows % 3 == 0) & varies, 0.0, 1.0)  # [B]
    out = Batch({Keys.SCORES: scores, Keys.REWARD_STATUS: torch.zeros(len(batch), dtype=torch.long)})
    out[Keys.REWARD_EXTRA] = [{} for _ in range(len(batch))]
    return out


def _runtime(tmp_path, max_rounds: int = 4, **extra) -> Runtime:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("actor:\n  model:\n    path: /m\ndata:\n  train_files: [t.jsonl]\n")
    overrides = [
        "data.train_batch_size=4",
        "rollout.n=2",
        "actor.mini_batch_size=8",
        "actor.micro_batch_size=4",
        "trainer.quiet=false",
        "algorithm.dynamic_sampling.enable=true",
        f"algorithm.dynamic_sampling.max_rounds={max_rounds}",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    cfg = load_config(recipe, overrides)
    return Runtime(
        cfg=cfg,
        actor=SimpleNamespace(generate=_generate),
        ref=None,
        critic=None,
        train_data=DataLoader(_Rows(24), batch_size=4, seed=3, shuffle=True),
        val_data=None,
        rewards=SimpleNamespace(score=_score),
        tracker=None,
        tokenizer=None,
    )


def _step(rt: Runtime, step: int) -> tuple[Batch, dict[str, float]]:
    rt.begin_step(step)
    return steps.sample(rt, Timer(), n=rt.cfg.rollout.n)


def test_sample_refills_and_a_resumed_run_continues_exactly(tmp_path):
    rt = _runtime(tmp_path)
    first, m1 = _step(rt, 1)
    second, m2 = _step(rt, 2)
    for batch, m in ((first, m1), (second, m2)):
        assert m["dynamic_sampling/rounds"] > 1 and m["dynamic_sampling/dropped_groups"] > 0
        assert len(batch) == 8 and batch[Keys.GROUP_IDS].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert bool(informative_groups(batch[Keys.SCORES], batch[Keys.GROUP_IDS]).all())
    # every round took fresh prompts from the sampler, with its own seeds
    taken = 4 * int(m1["dynamic_sampling/rounds"] + m2["dynamic_sampling/rounds"])
    state = rt.train_data.state_dict()
    assert state["epoch"] * 24 + state["position"] == taken
    assert len(set(first[Keys.SAMPLE_SEEDS].tolist()) | set(second[Keys.SAMPLE_SEEDS].tolist())) == 8

    again = _runtime(tmp_path)
    _step(again, 1)
    saved = again.train_data.state_dict()  # what a checkpoint after step 1 holds
    resumed = _runtime(tmp_path)
    resumed.train_data.load_state_dict(saved)
    batch, m = _step(resumed, 2)
    assert m == m2
    for key in (Keys.PROMPT_IDS, Keys.PROMPT_MASK, Keys.SAMPLE_SEEDS, Keys.SCORES, Keys.GROUP_IDS):
        assert torch.equal(batch[key], second[key]), key


def test_sample_warns_in_one_line_when_the_cap_leaves_the_step_short(tmp_path, capsys):
    rt = _runtime(tmp_path, max_rounds=1)
    batch, m = _step(rt, 5)
    assert m["dynamic_sampling/short"] == 1.0 and m["dynamic_sampling/rounds"] == 1
    assert len(batch) == 2 * m["dynamic_sampling/kept_groups"] < 8
    err = [line for line in capsys.readouterr().err.splitlines() if "dynamic sampling" in line]
    assert len(err) == 1 and "step 5" in err[0] and "max_rounds" in err[0]
    kept = int(m["dynamic_sampling/kept_groups"])
    assert f"found {kept} of the 4 groups" in err[0] and f"training on {kept} groups, those" in err[0]
    assert err[0].endswith("(every one: metric dynamic_sampling/short)")
    # a long run short at every step: the console says so at the 1st and 10th, not every step
    for step in range(6, 15):
        _step(rt, step)
    err = [line for line in capsys.readouterr().err.splitlines() if "dynamic sampling" in line]
    assert len(err) == 1 and "step 14" in err[0] and "10 steps short so far" in err[0], err


def test_the_note_on_a_short_step_says_when_it_trains_on_the_first_round():
    m = {"dynamic_sampling/sampled_groups": 8.0, "dynamic_sampling/dropped_groups": 8.0,
         "dynamic_sampling/kept_groups": 4.0, "dynamic_sampling/rounds": 2.0}  # fmt: skip
    note = sampling.short_step_note(m, wanted=4)
    assert note.startswith("dynamic sampling found 0 of the 4 groups") and note.endswith("the first round as sampled")


def test_sample_without_dynamic_sampling_is_one_round(tmp_path):
    rt = _runtime(tmp_path, **{"algorithm.dynamic_sampling.enable": "false"})
    batch, m = _step(rt, 1)
    assert len(batch) == 8 and not any(k.startswith("dynamic_sampling/") for k in m)
    assert rt.train_data.state_dict()["position"] == 4


def test_overlong_shaping_is_added_to_the_scores(tmp_path):
    rt = _runtime(
        tmp_path,
        **{
            "algorithm.dynamic_sampling.enable": "false",
            "algorithm.overlong.enable": "true",
            "algorithm.overlong.buffer": 2,
            "rollout.max_response_length": 5,
        },
    )
    batch, m = _step(rt, 1)  # every response is 4 tokens long: penalty (3 - 4) / 2 = -0.5
    raw = _score(batch)[Keys.SCORES]
    assert torch.equal(batch[Keys.SCORES], raw - 0.5)
    assert m["overlong/penalty_mean"] == -0.5 and m["overlong/penalized_frac"] == 1.0
    assert m["reward/score_mean"] == pytest.approx(float(raw.mean()))  # before the penalty


def test_merged_rounds_take_extremes_sum_counts_and_weight_means():
    rounds = [(2, {"reward/max": 0.5, "reward/min": 0.0, "reward/mean": 0.25, "reward/errors": 1.0}),
              (6, {"reward/max": 1.0, "reward/min": 0.25, "reward/mean": 0.75, "reward/errors": 2.0})]
    merged = sampling.merge_rounds(rounds)
    assert merged == {"reward/max": 1.0, "reward/min": 0.0, "reward/mean": (2 * 0.25 + 6 * 0.75) / 8,
                      "reward/errors": 3.0}
