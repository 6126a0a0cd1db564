"""The hybrid actor-rollout worker: an FSDP2 policy and a vLLM engine in one process.

On GPU vLLM sleeps (level 1: weights copied to host memory, KV cache freed) except
while it generates or receives weights, so training has the device memory.

Per training step the driver calls, in order: ``generate`` (vLLM), ``compute_logprobs``
(the trainer's log-probs before the update), ``update`` (the clipped policy-gradient
step), ``sync_weights`` (stream the new weights into vLLM, in place). With LoRA adapters
(``actor.lora``) the sync sends the weights with the adapters merged in, and the group
also serves as the reference (``compute_ref_logprobs``: the adapters disabled).

When the rollout batch is one optimizer step (``old_logprobs_from_update``) the old
log-probs are the current policy's: ``update`` takes them, detached, from its own forward
instead of a separate pass, and ``take_old_logprobs`` hands them to the driver afterwards.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flowrl.algos import aggregate, compute_policy_loss, entropy_loss, kl_loss
from flowrl.algos.config import PolicyLossConfig
from flowrl.batch import Batch
from flowrl.controller import Dispatch, DispatchInfo, Worker, register
from flowrl.engines.base import Normalizer, TurnSampling
from flowrl.engines.memory import STAGE_PEAKS
from flowrl.engines.sequences import response_lengths
from flowrl.engines.sync import sync_weights
from flowrl.engines.vllm_rollout import DTYPES, replica_info
from flowrl.engines.weight_transfer import Manifest, SyncAddress, WeightSender
from flowrl.keys import Keys
from flowrl.workers.agent_loop import AgentLoop, TurnLimits
from flowrl.workers.checkpointing import ProcessRNG
from flowrl.workers.engines import build_rollout, build_train_engine, worker_config

Metrics = dict[str, float]


def old_logprobs_from_update(cfg: DictConfig, rows: int) -> bool:
    """Whether ``update`` supplies the old log-probs of a batch of ``rows`` responses: one
    epoch of one mini-batch (the policy before the step is the one that sampled) and no
    in-reward KL (which needs them before the advantages). ``actor.fuse_old_logprobs``."""
    a = cfg.actor
    return bool(a.fuse_old_logprobs and a.epochs == 1 and rows <= a.mini_batch_size) and not bool(
        cfg.algorithm.use_kl_in_reward
    )


def build_agent_loop(cfg: DictConfig, rollout: Any) -> AgentLoop | None:
    """The multi-turn loop of ``rollout.multi_turn`` (None when it is off)."""
    mt = cfg.rollout.multi_turn
    if not mt.enable:
        return None
    limits = TurnLimits(mt.max_turns, cfg.rollout.max_response_length, mt.step_timeout_s)
    kwargs = OmegaConf.to_container(mt.env_kwargs)
    return AgentLoop(rollout, rollout.tokenizer, mt.env, kwargs, limits, mt.max_concurrent_steps)  # type: ignore[arg-type]


class ActorRollout(ProcessRNG, Worker):
    """Hybrid worker: trains the policy with FSDP2 and samples from it with vLLM."""

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self, config: DictConfig | dict[str, Any]) -> None:
        self.cfg: DictConfig = worker_config(config)
        self.init_distributed()
        torch.manual_seed(self.cfg.trainer.seed)
        self.trainer = build_train_engine(
            self.cfg, self.cfg.actor.model, self.cfg.actor.optim, value_head=False
        )
        self.loss_cfg: PolicyLossConfig = self.cfg.actor.policy_loss  # the typed section, as loaded
        self.sender: WeightSender | None = None
        if self.cfg.placement.rollout_workers > 0:  # split placement: the engines are RolloutWorkers
            self.rollout = self.agent_loop = None
            return
        self.rollout = build_rollout(self.cfg, self.rank)
        self.tokenizer = self.rollout.tokenizer
        self.agent_loop = build_agent_loop(self.cfg, self.rollout)  # None: single-turn rollouts
        self.sync_weights()  # vLLM loaded the checkpoint; this also proves the sync path at start-up

    def dispatch_info(self) -> DispatchInfo:
        """``generate`` (DP_COMPUTE) sends each rollout replica's T ranks the same prompts and
        keeps the output of its first rank; the training methods (DP_ALL_RANKS) split over all ranks."""
        tp = 1 if self.rollout is None else self.cfg.rollout.tensor_parallel_size
        replica, replicas, tp_rank = replica_info(self.rank, self.world_size, tp)
        return DispatchInfo(dp_rank=replica, dp_size=replicas, is_collect=tp_rank == 0)

    # ---- rollout -------------------------------------------------------------------
    @register(Dispatch.DP_COMPUTE)
    def generate(self, prompts: Batch, n: int = 1, temperature: float | None = None) -> Batch:
        """``n`` responses per prompt (``aabb`` order) with response ids, mask, text and sampler log-probs."""
        r = self.cfg.rollout
        temperature = r.temperature if temperature is None else temperature
        seeds = prompts[Keys.SAMPLE_SEEDS].tolist() if Keys.SAMPLE_SEEDS in prompts else None
        with STAGE_PEAKS("generate"):
            if self.cfg.actor.offload:  # the trainer's state waits in host memory while vLLM generates
                STAGE_PEAKS.note("offloaded_gib", self.trainer.offload() / 2**30)  # type: ignore[attr-defined]
            try:
                self.rollout.wake_up()  # GPU: weights and KV cache back (a no-op when awake, and on CPU)
                if self.agent_loop is not None:  # multi-turn: the model and an environment take turns
                    sampling = TurnSampling(temperature, r.top_p, r.top_k)
                    out = self.agent_loop.run(prompts, n, sampling, seeds)
                else:
                    out = self.rollout.generate(
                        prompts,
                        n=n,
                        temperature=temperature,
                        top_p=r.top_p,
                        top_k=r.top_k,
                        max_tokens=r.max_response_length,
                        ignore_eos=r.ignore_eos,
                        seeds=seeds,
                    )
                STAGE_PEAKS.note_used("generate")  # vLLM awake: its weights and KV cache count here
                self.rollout.sleep()  # GPU: free vLLM's weights and KV cache for training (no-op on CPU)
            finally:  # a failed generation must not leave the trainer without its state
                if self.cfg.actor.offload:
                    self.trainer.onload()  # type: ignore[attr-defined]
        ids, lengths = out[Keys.RESPONSE_IDS], response_lengths(out[Keys.RESPONSE_MASK])
        out[Keys.RESPONSE_TEXT] = [
            self.tokenizer.decode(row[: int(k)].tolist(), skip_special_tokens=True) for row, k in zip(ids, lengths)
        ]
        return out

    @register(Dispatch.ONE_TO_ALL)
    def sync_weights(self) -> Metrics:
        """Stream the FSDP2 weights into vLLM in place; returns seconds, bytes and GB/s."""
        with STAGE_PEAKS("weight_sync"):
            # with actor.offload the KV cache wakes in generate, once the trainer's state has left the device
            bucket = self.cfg.rollout.sync_bucket_mb * 2**20
            return sync_weights(self.trainer, self.rollout, bucket, wake_kv_cache=not self.cfg.actor.offload)

    # ---- split placement: weights to the rollout workers (flowrl.engines.weight_transfer) ----
    @register(Dispatch.ONE_TO_ALL)
    def open_weight_sync(self, rollout_workers: int) -> tuple[SyncAddress, Manifest] | None:
        """Rank 0 hosts the weight-sync rendezvous for itself and ``rollout_workers`` receivers;
        returns its address and the manifest (names, shapes) the receivers cut buckets from."""
        if self.rank != 0:
            return None
        r = self.cfg.rollout
        manifest = self.trainer.full_manifest()  # type: ignore[attr-defined]  # with LoRA: merged, base names
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        bucket = r.sync_bucket_mb * 2**20
        # the node address Ray gave this group (MASTER_ADDR of rank 0 is its own): reachable from other nodes
        self.sender = WeightSender(manifest, DTYPES[r.dtype], bucket, 1 + rollout_workers, device, self.master_addr)
        return self.sender.address, manifest

    @register(Dispatch.ONE_TO_ALL)
    def connect_weight_sync(self) -> None:
        """Rank 0 joins the receivers (collective with their ``connect_weight_sync``)."""
        if self.sender is not None:
            self.sender.connect(self.cfg.placement.sync_timeout_s)

    @register(Dispatch.ONE_TO_ALL)
    def send_weights(self) -> Metrics:
        """Every rank drains the full-tensor stream (FSDP2 all-gathers); rank 0 broadcasts it to the
        rollout workers (collective with their ``receive_weights``). Seconds and bytes."""
        start = time.perf_counter()
        stream = self.trainer.full_tensors(DTYPES[self.cfg.rollout.dtype])  # type: ignore[attr-defined]
        if self.sender is None:
            for _ in stream:  # the other ranks take part in the all-gathers only
                pass
            return {"seconds": time.perf_counter() - start, "bytes": 0.0}
        try:
            return self.sender.send(stream)
        except RuntimeError as e:
            raise RuntimeError(
                f"the weight sync to the rollout workers failed ({e}); a rollout worker is gone or stuck "
                f"(placement.sync_timeout_s={self.cfg.placement.sync_timeout_s:g})"
            ) from None

    @register(Dispatch.ONE_TO_ALL)
    def memory_stats(self) -> Metrics:
        """Peak GPU memory per stage of every role in this process since the last call (GPU; {} on CPU)."""
        return STAGE_PEAKS.pop()

    # ---- training --------------------------------------------------------------------
    @register(Dispatch.DP_ALL_RANKS)
    def compute_logprobs(self, batch: Batch) -> Batch:
        """The policy's log-probs (and, with ``actor.log_entropy``, entropies) before the update."""
        with_entropy = self.cfg.actor.log_entropy
        with STAGE_PEAKS("old_logprobs"):
            logprobs, entropy = self.trainer.compute_logprobs(
                batch,
                self.cfg.rollout.temperature,
                self.cfg.actor.micro_batch_size,
                with_entropy=with_entropy,
            )
        out = Batch({Keys.OLD_LOGPROBS: logprobs})
        if with_entropy:
            out[Keys.ENTROPY] = entropy
        return out

    @register(Dispatch.DP_ALL_RANKS)
    def update(self, batch: Batch) -> list[Metrics]:
        """``actor.epochs`` passes of mini-batch steps over this rank's share of the rollout.

        A batch without ``OLD_LOGPROBS`` must be one step (``old_logprobs_from_update``): its
        forward's log-probs, detached, are the old ones; ``take_old_logprobs`` returns them.
        """
        a = self.cfg.actor
        per_rank = a.mini_batch_size // self.world_size
        fused = Keys.OLD_LOGPROBS not in batch
        if fused and (a.epochs != 1 or len(batch) > per_rank):
            raise ValueError(
                f"ActorRollout.update: a batch without old log-probs must be one optimizer step, but it has "
                f"{len(batch)} responses on this rank for {per_rank} per step (actor.mini_batch_size="
                f"{a.mini_batch_size}) and actor.epochs={a.epochs}; call compute_logprobs first"
            )
        with_entropy = a.entropy_coef != 0.0 or (fused and a.log_entropy)
        loss = self._fused_loss if fused else self._loss
        self._taken: list[dict[str, torch.Tensor]] = []
        history = []
        with STAGE_PEAKS("update"):
            for _ in range(a.epochs):
                for mini in batch.split(per_rank):
                    metrics = self.trainer.train_step(
                        mini, loss, a.micro_batch_size, self.cfg.rollout.temperature, with_entropy
                    )
                    history.append({f"actor/{k}": v for k, v in metrics.items()})
        return history

    @register(Dispatch.DP_ALL_RANKS)
    def take_old_logprobs(self, batch: Batch) -> Batch:
        """The old log-probs (and, with ``actor.log_entropy``, entropies) that the last ``update``
        of ``batch`` (without ``OLD_LOGPROBS``) took from its forward.  -> {key: [B, R]}"""
        out = Batch({k: torch.cat([p[k] for p in self._taken]) for k in self._taken[0]})
        if len(out) != len(batch):
            raise ValueError(f"take_old_logprobs: {len(out)} rows kept by update, {len(batch)} asked for")
        return out

    def _fused_loss(
        self, micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer
    ) -> tuple[torch.Tensor, Metrics]:
        """``_loss`` with the old log-probs of this very forward (the policy before the step)."""
        old = {Keys.OLD_LOGPROBS: out[Keys.LOGPROBS].detach()}  # [b, R]
        if self.cfg.actor.log_entropy:
            old[Keys.ENTROPY] = out[Keys.ENTROPY].detach()  # [b, R]
        self._taken.append({k: v.float().cpu() for k, v in old.items()})
        return self._loss(micro | Batch({Keys.OLD_LOGPROBS: old[Keys.OLD_LOGPROBS]}), out, norm)

    def _loss(
        self, micro: Batch, out: dict[str, torch.Tensor], norm: Normalizer
    ) -> tuple[torch.Tensor, Metrics]:
        a = self.cfg.actor
        mask = micro[Keys.RESPONSE_MASK]  # [b, R]
        rollout_lp = micro[Keys.ROLLOUT_LOGPROBS] if Keys.ROLLOUT_LOGPROBS in micro else None
        pg, metrics = compute_policy_loss(
            out[Keys.LOGPROBS],
            micro[Keys.OLD_LOGPROBS],
            micro[Keys.ADVANTAGES],
            mask,
            self.loss_cfg,
            rollout_lp,
        )  # [b, R]
        loss = pg
        if a.entropy_coef != 0.0:
            ent, ent_metrics = entropy_loss(out[Keys.ENTROPY], mask)  # [b, R], -H
            loss = loss + a.entropy_coef * ent
            metrics.update(ent_metrics)
        if a.use_kl_loss:
            kl, kl_metrics = kl_loss(out[Keys.LOGPROBS], micro[Keys.REF_LOGPROBS], mask, a.kl_loss_type)
            loss = loss + a.kl_loss_coef * kl
            metrics.update({f"kl_loss/{k}": v for k, v in kl_metrics.items()})
        metrics["pg_loss"] = aggregate(pg, mask, a.loss_agg_mode).detach()
        total = aggregate(loss, mask, a.loss_agg_mode, norm.global_tokens, norm.global_seqs)
        return total, {k: float(v) for k, v in metrics.items()}

    @register(Dispatch.DP_ALL_RANKS)
    def compute_ref_logprobs(self, batch: Batch) -> Batch:
        """The reference policy's log-probs when it is this policy's base model (``actor.lora``
        on, no ``reference.path``): the trainer's model with its adapters disabled, so the
        reference needs no second copy of the weights (``flowrl.trainer.runtime``)."""
        with STAGE_PEAKS("ref"), self.trainer.adapters_off():  # type: ignore[attr-defined]
            logprobs, _ = self.trainer.compute_logprobs(
                batch, self.cfg.rollout.temperature, self.cfg.actor.micro_batch_size
            )
        return Batch({Keys.REF_LOGPROBS: logprobs})

    # ---- checkpoints -------------------------------------------------------------------
    @register(Dispatch.ONE_TO_ALL)
    def save(self, path: str) -> None:
        self.trainer.save(path)

    @register(Dispatch.ONE_TO_ALL)
    def save_hf(self, path: str) -> None:
        """The current policy as a Hugging Face folder (weights, config, tokenizer) for transformers and vLLM."""
        self.trainer.save_hf(path)

    @register(Dispatch.ONE_TO_ALL)
    def load(self, path: str) -> None:
        self.trainer.load(path)
        if self.rollout is not None:  # split placement: the driver sends the loaded weights itself
            self.sync_weights()
