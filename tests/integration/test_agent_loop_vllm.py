"""Multi-turn rollouts through real vLLM (CPU): token-exact trajectories, the sampler's log-probs
equal the trainer's recomputation on the model's tokens, and the loop's limits end trajectories."""

from __future__ import annotations

import os

import pytest
import torch

from flowrl.engines.base import TurnSampling
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from tests.integration.generation import make_prompts
from tests.integration.multirank import run_plain

pytestmark = pytest.mark.slow


def _rollout(model_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    from flowrl.engines.sequences import model_inputs, token_logprobs
    from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
    from flowrl.workers.agent_loop import AgentLoop, TurnLimits

    class Recording(AgentLoop):
        """The loop, keeping every turn exactly as the engine returned it."""

        def finished(self, outputs):
            for out in outputs:
                self.turn_log.setdefault(int(out.key), []).append(list(out.token_ids))
            super().finished(outputs)

    rollout = VLLMRollout(VLLMRolloutConfig(model_path=model_dir, max_model_len=256))
    tok = rollout.tokenizer
    loop = Recording(rollout, tok, "tests.integration.agent_envs:Chatter", {}, TurnLimits(4, 96, 30.0))
    loop.turn_log = {}
    prompts = make_prompts(4, seed=3)
    out = loop.run(prompts, 2, TurnSampling(temperature=1.0), seeds=[5, 6, 7, 8])
    turn_log, loop.turn_log = loop.turn_log, {}
    again = loop.run(prompts, 2, TurnSampling(temperature=1.0), seeds=[5, 6, 7, 8])

    # what the trajectories must be: <start>, then each sampled turn followed by its observation
    expected, exact = [], []
    for key, turns in sorted(turn_log.items()):
        ids, model = tok.encode("<start>", add_special_tokens=False), []
        model = [False] * len(ids)
        for t, turn in enumerate(turns):
            ids, model = ids + turn, model + [True] * len(turn)
            if t < len(turns) - 1:  # an observation follows every turn but the last
                obs = tok.encode(f"[obs {t + 1}]", add_special_tokens=False)
                ids, model = ids + obs, model + [False] * len(obs)
        expected.append((ids, model))
    for row, (ids, model) in enumerate(expected[: len(out)]):
        k = len(ids)
        exact.append(
            out[Keys.RESPONSE_IDS][row, :k].tolist() == ids
            and out[Keys.RESPONSE_MASK][row, :k].bool().tolist() == model
            and out[Keys.OBSERVATION_MASK][row, :k].bool().tolist() == [not m for m in model]
            and not out[Keys.RESPONSE_MASK][row, k:].any()
        )
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = model_inputs(out, trim=False)
    with torch.no_grad():
        logits = hf(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).logits
    p = out[Keys.PROMPT_IDS].shape[1]
    trainer = token_logprobs(logits[:, p - 1 : -1], out[Keys.RESPONSE_IDS], 1.0)  # [B, R]
    mask = out[Keys.RESPONSE_MASK].bool()
    return {
        "rows": len(out),
        "exact": exact,
        "turns": out[Keys.NUM_TURNS].tolist(),
        "reasons": list(out[Keys.FINISH_REASON]),
        "scores": out[Keys.SCORES].tolist(),
        "token_score_sum": out[Keys.TOKEN_SCORES].sum(-1).tolist(),
        "tool_calls": out[Keys.TOOL_CALLS].tolist(),
        "max_logprob_diff": float((trainer - out[Keys.ROLLOUT_LOGPROBS])[mask].abs().max()),
        "model_tokens": int(mask.sum()),
        "repeatable": torch.equal(out[Keys.RESPONSE_IDS], again[Keys.RESPONSE_IDS]),
        "truncated": out[Keys.TRUNCATED].tolist(),
    }


def test_multi_turn_rollout_is_token_exact(tmp_path) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    make_tiny_model(tmp_path / "m", seed=0)
    res = run_plain(_rollout, str(tmp_path / "m"))
    assert res["rows"] == 8 and all(res["exact"]) and len(res["exact"]) == 8
    assert res["model_tokens"] > 8
    # the sampler's log-probs are the trainer's on every model token (fp32 CPU)
    assert res["max_logprob_diff"] < 1e-4, res["max_logprob_diff"]
    assert res["repeatable"]  # seeded turns: the same trajectories again
    for turns, reason, score, token_sum, calls, truncated in zip(
        res["turns"], res["reasons"], res["scores"], res["token_score_sum"], res["tool_calls"], res["truncated"]
    ):
        assert score == pytest.approx(token_sum)
        if reason == "stop" and turns == 3:  # Chatter's full course: 0.25 + 0.25 + 1.0
            assert score == pytest.approx(1.5) and calls == 2 and not truncated
        else:  # EOS ended it early (scored by that turn's step) or the token budget did
            assert reason in ("stop", "length") and turns <= 3 and truncated == (reason != "stop")
    assert "stop" in res["reasons"]
