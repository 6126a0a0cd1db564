"""The hybrid workers on real Ray, real FSDP2 (2 ranks, gloo) and real vLLM on CPU.

One colocated group (actor-rollout + reference + critic in each of 2 processes) runs the
calls of a PPO step; the checks are the correctness rules that need the whole stack.
"""

import pytest
import torch
from omegaconf import OmegaConf

from flowrl.algos import compute_advantages
from flowrl.algos.config import AdvantageConfig
from flowrl.batch import Batch
from flowrl.config import load_config
from flowrl.controller import ResourcePool, WorkerGroup, init_ray
from flowrl.data.padding import left_pad
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model, make_tokenizer
from flowrl.workers.actor_rollout import ActorRollout
from flowrl.workers.critic import Critic
from flowrl.workers.reference import Reference

pytestmark = pytest.mark.slow

PROMPTS = ["1+1=", "What is 2+3?", "abc", "Hello", "7*8", "The sky is", "x", "12-5="]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    import ray

    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(path, seed=3)
    cfg = load_config(
        None,
        [
            f"actor.model.path={path}",
            f"critic.model.path={path}",
            "critic.enable=true",
            "data.train_files=[unused.jsonl]",
            "data.train_batch_size=8",
            "rollout.n=1",
            "rollout.max_response_length=8",
            "rollout.temperature=1.0",
            "rollout.gpu_memory_utilization=0.05",
            "actor.mini_batch_size=8",
            "actor.micro_batch_size=2",
            "actor.optim.lr=0.05",
            "algorithm.advantage.estimator=gae",
            "trainer.num_workers=2",
            "trainer.total_steps=2",
        ],
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    init_ray(num_cpus=2, env_vars={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"})
    roles = {"actor": ActorRollout, "ref": Reference, "critic": Critic}
    g = WorkerGroup.colocated(ResourcePool(2, num_cpus_per_bundle=1), roles)
    for role in ("actor", "ref", "critic"):
        g[role].init_model(config)
    yield g
    g["actor"].shutdown()
    ray.shutdown()


def prompts_batch() -> Batch:
    tok = make_tokenizer()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id)
    return Batch({Keys.PROMPT_IDS: prompt_ids, Keys.PROMPT_MASK: prompt_mask})


def test_colocated_roles_share_processes(groups):
    assert groups["actor"].pids == groups["ref"].pids == groups["critic"].pids
    assert len(set(groups["actor"].pids)) == 2


def test_ppo_step_through_the_workers(groups):
    actor, ref, critic = groups["actor"], groups["ref"], groups["critic"]
    batch = actor.generate(prompts_batch(), n=1)
    assert len(batch) == 8 and batch[Keys.RESPONSE_IDS].shape == (8, 8)
    assert all(isinstance(t, str) for t in batch[Keys.RESPONSE_TEXT])

    batch = batch | actor.compute_logprobs(batch) | ref.compute_ref_logprobs(batch) | critic.compute_values(batch)
    mask = batch[Keys.RESPONSE_MASK]
    # the sampler's log-probs agree with the trainer's recomputation (fp32, CPU)
    delta = ((batch[Keys.OLD_LOGPROBS] - batch[Keys.ROLLOUT_LOGPROBS]).abs() * mask).max().item()
    assert delta < 1e-3, f"rollout vs trainer log-prob max |delta| = {delta}"
    # before any update the reference is the policy
    assert torch.equal(batch[Keys.REF_LOGPROBS], batch[Keys.OLD_LOGPROBS])

    scores = torch.arange(8, dtype=torch.float32)  # [B] any non-constant reward
    last = mask.sum(-1).long() - 1  # [B]
    token_rewards = torch.zeros_like(mask)
    token_rewards[torch.arange(8), last] = scores
    batch[Keys.TOKEN_REWARDS] = token_rewards
    batch[Keys.ADVANTAGES], batch[Keys.RETURNS] = compute_advantages(batch, AdvantageConfig(estimator="gae"))

    history = actor.update(batch)
    first = [h[0] for h in history]  # one mini-batch step per rank
    # step-0 consistency: the first update starts from old_logprobs exactly
    assert all(m["actor/ppo_kl"] == 0.0 and m["actor/clipfrac"] == 0.0 for m in first)
    assert all(m["actor/grad_norm"] > 0 for m in first)
    critic_history = critic.update(batch)
    assert all(h[0]["critic/grad_norm"] > 0 for h in critic_history)

    sync = actor.sync_weights()
    assert all(s["bytes"] > 0 for s in sync)
    after = actor.compute_logprobs(batch)
    assert not torch.allclose(after[Keys.OLD_LOGPROBS], batch[Keys.OLD_LOGPROBS])
    # after the sync, vLLM samples from the updated policy: its log-probs match the trainer's again
    fresh = actor.generate(prompts_batch(), n=1)
    fresh = fresh | actor.compute_logprobs(fresh)
    delta = ((fresh[Keys.OLD_LOGPROBS] - fresh[Keys.ROLLOUT_LOGPROBS]).abs() * fresh[Keys.RESPONSE_MASK]).max()
    assert delta.item() < 1e-3
    # the reference did not move
    assert torch.equal(ref.compute_ref_logprobs(batch)[Keys.REF_LOGPROBS], batch[Keys.REF_LOGPROBS])


def test_save_hf_folder_answers_like_the_actor(groups, tmp_path):
    """The exported folder, loaded by transformers, gives vLLM's greedy answers (synced weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = groups["actor"]
    actor.save_hf(str(tmp_path / "hf"))
    greedy = actor.generate(prompts_batch(), n=1, temperature=0.0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template and tok.eos_token_id == make_tokenizer().eos_token_id
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])  # [1, p]
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        n = int(greedy[Keys.RESPONSE_MASK][i].sum())
        assert out[0, ids.shape[1] : ids.shape[1] + n].tolist() == greedy[Keys.RESPONSE_IDS][i, :n].tolist()
