"""The SFT worker: an FSDP2 causal LM trained with next-token cross-entropy.

Each rank takes its share of a global batch of right-padded sequences (``INPUT_IDS``,
``ATTENTION_MASK``, ``LOSS_MASK``). The loss is the mean over the target tokens of the
*whole* global batch (the engine's ``Normalizer`` counts ``LOSS_MASK`` over all ranks and
micro-batches), so the gradient does not depend on the number of ranks or micro-batches.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from flowrl.algos import aggregate, sft_loss
from flowrl.batch import Batch
from flowrl.controller import Dispatch, Worker, register
from flowrl.data.dataset import pad_token_id
from flowrl.data.sft import eos_token_id
from flowrl.engines.base import Metrics, Normalizer
from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
from flowrl.keys import Keys
from flowrl.workers.checkpointing import EngineCheckpoints, ProcessRNG


def sft_token_mean_loss(
    micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer
) -> tuple[torch.Tensor, Metrics]:
    """The engine's loss function: summed over micro-batches and ranks, the global token mean."""
    mask = micro[Keys.LOSS_MASK]  # [b, L]
    nll, metrics = sft_loss(out[Keys.LOGPROBS], mask)  # [b, L]
    return aggregate(nll, mask, "token-mean", global_tokens=norm.global_tokens), dict(metrics)


class SFTWorker(EngineCheckpoints, ProcessRNG, Worker):
    """Supervised fine-tuning on one rank of a data-parallel group."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, engine: FSDPEngineConfig, micro_batch_size: int) -> None:
        self.init_distributed()
        torch.manual_seed(engine.seed)
        self.engine = FSDPEngine(engine)
        self.micro_batch_size = micro_batch_size
        tokenizer = AutoTokenizer.from_pretrained(engine.model_path)
        self.eos_id, self.pad_id = eos_token_id(tokenizer), pad_token_id(tokenizer)

    @register(Dispatch.DP_COMPUTE)
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on the global batch; ``loss`` is its token-mean NLL (before the step)."""
        return self.engine.train_step(batch, sft_token_mean_loss, self.micro_batch_size)

    @register(Dispatch.DP_COMPUTE)
    def compute_logprobs(self, batch: Batch) -> Batch:
        """LOGPROBS [B, L]: log pi(x_t | x_<t) at column t (0 at column 0 and on padding)."""
        logprobs, _ = self.engine.compute_logprobs(batch, 1.0, self.micro_batch_size)
        return Batch({Keys.LOGPROBS: logprobs})

    @register(Dispatch.DP_COMPUTE)
    def generate_greedy(self, prompts: Batch, max_new_tokens: int) -> Batch:
        """RESPONSE_IDS / RESPONSE_MASK [B, max_new_tokens] of greedy decoding with the trained model."""
        ids, mask = self.engine.generate_greedy(prompts, max_new_tokens, self.eos_id, self.pad_id)
        return Batch({Keys.RESPONSE_IDS: ids, Keys.RESPONSE_MASK: mask})

    @register(Dispatch.ONE_TO_ALL)
    def save_hf(self, path: str) -> None:
        """A Hugging Face folder (weights, config, tokenizer) that transformers and vLLM load."""
        self.engine.save_hf(path)
