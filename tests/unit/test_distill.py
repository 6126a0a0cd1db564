"""On-policy distillation's estimator and metrics against loops written from the equation, and the
load-time refusals of recipes where it does not compose.

    A_t = log pi_T(y_t | x, y_<t) - log pi_old(y_t | x, y_<t)  (+ w * GRPO's A_i)

The references are plain Python over floats (never calling flowrl's code); the inputs are ragged
(a length-1 row, an empty row, a hole), over several seeds, with NaN / inf at masked positions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from flowrl.algos import AdvantageConfig, compute_advantages, distill_advantages, distill_metrics
from flowrl.batch import Batch
from flowrl.config import ConfigError, load_config
from flowrl.keys import Keys

SEEDS = range(4)
B, R = 6, 7


def ragged(seed: int) -> dict[str, torch.Tensor]:
    """[6, 7] inputs: row 1 has one token, row 2 none, row 0 a hole; garbage where masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, R + 1, (B,), generator=g)
    lengths[1], lengths[2] = 1, 0
    mask = (torch.arange(R)[None, :] < lengths[:, None]).float()  # [B, R]
    mask[0, 1] = 0.0
    teacher = -torch.rand(B, R, generator=g) * 4  # [B, R]
    old = -torch.rand(B, R, generator=g) * 4  # [B, R]
    teacher[mask == 0] = float("nan")
    old[mask == 0] = float("-inf")
    return {
        "teacher": teacher,
        "old": old,
        "mask": mask,
        "scores": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        "group_ids": torch.tensor([0, 0, 1, 1, 2, 2]),
    }


def reference_advantages(d, weight: float = 0.0, eps: float = 1e-6) -> list[list[float]]:
    """A_t = log pi_T - log pi_old on valid tokens, + w * (r_i - mean_g) / (std_g + eps); 0 elsewhere."""
    teacher, old, mask = d["teacher"].tolist(), d["old"].tolist(), d["mask"].tolist()
    scores, groups = d["scores"].tolist(), d["group_ids"].tolist()
    out = [[0.0] * R for _ in range(B)]
    for i in range(B):
        members = [scores[j] for j in range(B) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((s - mean) ** 2 for s in members) / (len(members) - 1)) if len(members) > 1 else 0.0
        grpo = (scores[i] - mean) / (std + eps) if std > 0 else 0.0
        for t in range(R):
            if mask[i][t] > 0:
                out[i][t] = teacher[i][t] - old[i][t] + weight * grpo
    return out


def reference_metrics(d) -> dict[str, float]:
    teacher, old, mask = d["teacher"].tolist(), d["old"].tolist(), d["mask"].tolist()
    kl, lp, seqs = [], [], []
    for i in range(B):
        terms = [old[i][t] - teacher[i][t] for t in range(R) if mask[i][t] > 0]
        kl += terms
        lp += [teacher[i][t] for t in range(R) if mask[i][t] > 0]
        if terms:
            seqs.append(sum(terms))
    return {"reverse_kl": sum(kl) / len(kl), "teacher_logprob": sum(lp) / len(lp), "seq_reverse_kl": sum(seqs) / len(seqs)}


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_advantages_match_the_equation(seed):
    d = ragged(seed)
    adv = distill_advantages(d["teacher"], d["old"], d["mask"])  # [B, R]
    assert_close(adv, torch.tensor(reference_advantages(d)))
    assert torch.isfinite(adv).all() and (adv[d["mask"] == 0] == 0).all()
    assert (adv[2] == 0).all()  # the empty row


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_registered_estimator_adds_grpo_with_its_weight(seed, weight):
    d = ragged(seed)
    batch = Batch(
        {
            Keys.TEACHER_LOGPROBS: d["teacher"],
            Keys.OLD_LOGPROBS: d["old"],
            Keys.RESPONSE_MASK: d["mask"],
            Keys.SCORES: d["scores"],
            Keys.GROUP_IDS: d["group_ids"],
        }
    )
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator="distill", distill_reward_weight=weight))
    assert_close(adv, torch.tensor(reference_advantages(d, weight)))
    assert adv is ret or torch.equal(adv, ret)


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_metrics_match_the_loop(seed):
    d = ragged(seed)
    got = distill_metrics(d["teacher"], d["old"], d["mask"])
    want = reference_metrics(d)
    for key, value in want.items():
        assert_close(float(got[key]), value, msg=key)


def test_a_student_equal_to_its_teacher_gets_zero_advantage_and_zero_kl():
    d = ragged(0)
    same = d["teacher"].clone()
    assert (distill_advantages(same, same, d["mask"]) == 0).all()
    assert float(distill_metrics(same, same, d["mask"])["reverse_kl"]) == 0.0


def test_gradients_reach_neither_input_at_masked_positions():
    d = ragged(1)
    teacher = d["teacher"].clone().requires_grad_()
    old = d["old"].clone().requires_grad_()
    distill_advantages(teacher, old, d["mask"]).sum().backward()
    assert_close(teacher.grad, d["mask"])
    assert_close(old.grad, -d["mask"])


def test_all_masked_batch():
    mask = torch.zeros(2, 3)
    x = torch.full((2, 3), float("nan"))
    assert (distill_advantages(x, x, mask) == 0).all()
    assert all(float(v) == 0.0 for v in distill_metrics(x, x, mask).values())


# ---- the recipe and where it does not compose ------------------------------------------
BASE = ["actor.model.path=m", "data.train_files=[a.parquet]"]
RECIPE = "recipes/distill_arithmetic_tiny.yaml"


def test_the_cpu_recipe_loads_with_a_teacher():
    cfg = load_config(RECIPE, [*BASE, "teacher.path=t"])
    assert cfg.trainer.algorithm == "distill" and cfg.algorithm.advantage.estimator == "distill"
    assert cfg.teacher.path == "t"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ([], "teacher.path is not"),  # the recipe's teacher section without a path
        (["teacher=null"], "distils a teacher: set teacher.path"),
        (["teacher.path=t", "algorithm.advantage.estimator=grpo"], "never reads its log-probs"),
        (["teacher.path=t", "trainer.algorithm=grpo"], "uses no teacher"),
        (["teacher=null", "trainer.algorithm=grpo"], "needs 'teacher_logprobs'"),  # the estimator elsewhere
        (["teacher.path=t", "critic.enable=true", "critic.model.path=c"], "uses no critic"),
        (["teacher.path=t", "rollout.n=1", "actor.mini_batch_size=8", "actor.micro_batch_size=4", "algorithm.advantage.distill_reward_weight=0.5"],
         "distill_reward_weight=0.5 adds GRPO"),
        (["teacher.path=t", "teacher.micro_batch_size=-1"], "teacher.micro_batch_size=-1"),
        (["teacher.path=t", "algorithm.dynamic_sampling.enable=true"], "every token carries the teacher's"),
        (["placement.separate=[teacher]", "teacher=null", "trainer.algorithm=grpo", "algorithm.advantage.estimator=grpo"],
         "placement.separate lists teacher"),
    ],
)
def test_recipes_that_do_not_compose_are_refused_in_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [*BASE, *overrides])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_separate_teacher_is_accepted():
    cfg = load_config(RECIPE, [*BASE, "teacher.path=t", "placement.separate=[teacher]"])
    assert list(cfg.placement.separate) == ["teacher"]


def test_a_teacher_with_another_tokenizer_is_refused_before_any_worker_starts(tmp_path):
    from flowrl.models.tiny import make_tiny_model
    from flowrl.trainer.preflight import InputError, check_teacher_tokenizer

    _, student_tok = make_tiny_model(tmp_path / "student")
    make_tiny_model(tmp_path / "teacher")
    cfg = load_config(RECIPE, [*BASE, f"teacher.path={tmp_path / 'teacher'}"])
    check_teacher_tokenizer(cfg, student_tok)  # same tokenizer: fine
    student_tok.add_tokens(["<|extra|>"])
    with pytest.raises(InputError) as e:
        check_teacher_tokenizer(cfg, student_tok)
    assert "differs from the student's" in str(e.value) and "\n" not in str(e.value)
