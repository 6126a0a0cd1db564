"""The training engine: a Hugging Face causal LM (or critic) sharded with FSDP2.

Every rank of the default process group holds one shard of each parameter
(``fully_shard`` per decoder layer, then the root), so the data-parallel group is the
whole world. The engine offers what the workers need and nothing about algorithms:

- ``compute_logprobs`` / ``compute_values`` / ``compute_sequence_scores``: forward passes
  with micro-batching, over rollout batches (prompt + response columns) or sequence
  batches (``INPUT_IDS``, SFT);
- ``train_step``: one optimizer step on this rank's mini-batch with a caller's loss (a
  rollout batch, a sequence batch, or a batch of preference pairs for a reward model);
- ``state_dict_stream``: full tensors under their Hugging Face names, in buckets, for
  the rollout engine;
- ``save`` / ``load`` (torch.distributed.checkpoint), ``save_hf`` (a Hugging Face folder)
  and ``offload`` / ``onload``.

A reward model is a value-head engine whose head has no bias (``head_bias=False``): its
weights are then exactly those of ``AutoModelForSequenceClassification`` (backbone +
``score``, Linear(hidden, 1, bias=False)), so it loads such folders and ``save_hf`` writes
one. Its score is the head's output at the last real token of each sequence.

Loss normalization. ``loss_fn`` returns a loss already divided by the *global* count
(tokens or sequences over all ranks and micro-batches, see ``Normalizer``; tokens are
those of ``RESPONSE_MASK``, or of ``LOSS_MASK`` in a sequence batch, and a sequence is a
row with at least one such token, as in ``flowrl.algos.aggregate.loss_counts``), so that the
sum over micro-batches and ranks is the global mean. FSDP2's reduce-scatter averages
gradients over ranks, so each rank backpropagates ``loss * dp_size``; the resulting
gradient is that of the global mean whatever the DP size and micro-batch split.
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from flowrl.algos.aggregate import loss_counts, reduce_metric
from flowrl.batch import Batch
from flowrl.engines.base import LossFn, Normalizer, run_device
from flowrl.engines.dcp_safety import check_dcp_metadata
from flowrl.engines.distributed import init_process_group
from flowrl.engines.lora import (
    LoraConfig,
    adapter_disabled,
    apply_lora,
    is_adapter_weight,
    lora_scales,
    merge_adapters,
    saved_name,
    target_names,
)
from flowrl.engines.offload import HostCopy
from flowrl.engines.optim import OptimizerConfig, build_optimizer
from flowrl.engines.packing import (
    Layout,
    budget_sizes,
    head_scores,
    lm_token_outputs,
    row_tokens,
    split_to_count,
)
from flowrl.engines.sequences import model_inputs
from flowrl.keys import Keys

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_HEAD_PREFIX = "score."  # the Linear(hidden, 1) of AutoModelForTokenClassification


@dataclass(frozen=True)
class FSDPEngineConfig:
    model_path: str  # a Hugging Face folder (config, weights, tokenizer)
    value_head: bool = False  # critic: backbone + Linear(hidden, 1) on the last hidden state
    head_bias: bool = True  # the value head's bias; False for a reward model (a sequence classifier's head)
    device: str = "cpu"  # "cpu" or "cuda"
    param_dtype: str = "float32"  # compute dtype of FSDP2's mixed precision; master weights stay fp32
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    reshard_after_forward: bool = True
    # No-grad passes (old log-probs, values, scores) over several micro-batches all-gather
    # each layer once and keep it until the pass ends, instead of once per micro-batch.
    # Costs the unsharded model in param_dtype on every rank for the pass (~2 bytes/param);
    # for slow links (across machines). Off: on one NVLink host it measured no faster.
    gather_once_for_inference: bool = False
    # Drop the columns that are padding in every row of a micro-batch before the forward:
    # faster, but a row's log-probs then depend (by float rounding, ~1e-7) on its
    # neighbours; off, they are bitwise independent of the micro-batching on CPU.
    trim_padding: bool = False
    # Pack each micro-batch's sequences into one row (no padding tokens; see engines/packing.py).
    packing: bool = True
    # Micro-batches by real tokens per rank instead of rows (0: micro_batch_size rows).
    max_tokens_per_micro_batch: int = 0
    # Tokens per chunk of the LM head's log-softmax: [chunk, vocab] fp32 logits at a time (0: all).
    logits_chunk_size: int = 1024
    seed: int = 0  # initializes the value head (and LoRA adapters) identically on every rank
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    # LoRA adapters (PEFT) on the model, only they train (flowrl/engines/lora.py); rank 0: off
    lora: LoraConfig = field(default_factory=LoraConfig)
    # with LoRA: the frozen base weights' dtype (the rollout's, so both hold the same values); without,
    # every parameter's (a model that never trains: the reference, a reward model); None: fp32 as loaded
    frozen_dtype: str | None = None
    # parameters, gradients and optimizer state live in host memory (FSDP2's CPUOffloadPolicy): each
    # layer visits the device for its forward and backward; the optimizer steps on the CPU
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(
                    f"FSDPEngineConfig.{key}={getattr(self, key)!r}: choose one of {list(DTYPES)}"
                )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"FSDPEngineConfig.device={self.device!r}: choose 'cpu' or 'cuda'")
        if self.frozen_dtype is not None and self.frozen_dtype not in DTYPES:
            raise ValueError(f"FSDPEngineConfig.frozen_dtype={self.frozen_dtype!r}: choose one of {list(DTYPES)}")


def load_hf_model(config: FSDPEngineConfig) -> nn.Module:
    """The unsharded fp32 model on CPU: a causal LM, or with ``value_head`` a token scorer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

    kwargs = {"dtype": torch.float32, "attn_implementation": config.attn_implementation}
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)  # weights missing from the folder (the value head) match on all ranks
        if config.value_head:
            hf_config = AutoConfig.from_pretrained(config.model_path, num_labels=1)
            # from_pretrained drops keyword arguments the config class does not declare: set them here
            hf_config.classifier_dropout = 0.0
            hf_config.token_classification_bias = config.head_bias
            model = AutoModelForTokenClassification.from_pretrained(
                config.model_path, config=hf_config, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(config.model_path, **kwargs)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora.enabled:
        frozen = DTYPES[config.frozen_dtype] if config.frozen_dtype is not None else None
        apply_lora(model, config.lora, config.seed, frozen)
    elif config.frozen_dtype is not None:  # a model that never trains, stored as it computes
        for p in model.parameters():
            p.data = p.data.to(DTYPES[config.frozen_dtype])
    return model


def shard_model(model: nn.Module, mesh: DeviceMesh, config: FSDPEngineConfig) -> None:
    """``fully_shard`` each decoder layer (the model's ``_no_split_modules``), then the root; with
    ``cpu_offload`` the shards stay in host memory (pinned when the compute device is a GPU)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[config.param_dtype], reduce_dtype=DTYPES[config.reduce_dtype]
    )
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{config.model_path}: found no decoder layers to shard (looked for {sorted(layer_classes)}); "
            "the model class must list its layer class in _no_split_modules"
        )
    where = CPUOffloadPolicy(pin_memory=config.device == "cuda") if config.cpu_offload else OffloadPolicy()
    for module in [*layers, model]:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=config.reshard_after_forward,
                    offload_policy=where)  # fmt: skip


def token_mask(batch: Batch) -> torch.Tensor:
    """The tokens a loss counts: ``LOSS_MASK`` of a sequence batch, else ``RESPONSE_MASK``.  -> [B, T]"""
    return batch[Keys.LOSS_MASK] if Keys.INPUT_IDS in batch else batch[Keys.RESPONSE_MASK]


def _loss_counts(batch: Batch) -> tuple[float, float]:
    """This rank's (tokens, sequences) for ``Normalizer``: the counts ``aggregate`` divides by.

    Rollout and sequence batches: ``loss_counts(token_mask(batch))``, the definition of
    ``flowrl.algos.aggregate`` (a row without a valid token, e.g. an empty response, is
    no sequence); preference pairs: the tokens of both sequences and the number of pairs.
    """
    if Keys.CHOSEN_IDS in batch:
        tokens = batch[Keys.CHOSEN_MASK].sum() + batch[Keys.REJECTED_MASK].sum()
        return float(tokens), float(len(batch))
    tokens, seqs = loss_counts(token_mask(batch))
    return float(tokens), float(seqs)


class FSDPEngine:
    """An FSDP2-sharded Hugging Face model with its AdamW optimizer and LR schedule."""

    def __init__(self, config: FSDPEngineConfig) -> None:
        self.config = config
        init_process_group(torch.device(config.device))  # on GPU this also selects cuda:LOCAL_RANK
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(self.device.type, (self.dp_size,), mesh_dim_names=("fsdp",))
        self.model = load_hf_model(config)
        shard_model(self.model, self.mesh, config)
        # the chunked LM head runs outside the model's forward: FSDP2 gathers the root for it too
        self.model.token_outputs = types.MethodType(lm_token_outputs, self.model)  # type: ignore[assignment]
        register_fsdp_forward_method(self.model, "token_outputs")
        self.lora_scales = lora_scales(self.model) if config.lora.enabled else {}  # module -> alpha / rank
        self.lora_targets = target_names(self.model) if config.lora.enabled else []  # q_proj, ...
        # only parameters that require a gradient (with LoRA: the adapters) get optimizer state
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), config.optim)
        self.global_step = 0
        self._host_copy = HostCopy()  # offload / onload

    @property
    def hf_model(self) -> PreTrainedModel:
        """The sharded model seen as what it also is: a Hugging Face model (generate, config, save)."""
        return cast("PreTrainedModel", self.model)

    def adapters_off(self) -> contextlib.AbstractContextManager[None]:
        """With LoRA: a block in which the model is exactly the base model (every adapter off),
        e.g. for the reference policy's log-probs without a second copy of the weights."""
        if not self.lora_scales:
            raise RuntimeError("FSDPEngine.adapters_off: this engine has no LoRA adapters (lora.rank=0)")
        return adapter_disabled(self.model)

    @property
    def layout(self) -> Layout:
        """How forwards lay out their rows (packed or padded), from the config."""
        c = self.config
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 0)
        return Layout(c.packing, c.trim_padding, c.attn_implementation, DTYPES[c.param_dtype], hidden)

    # ---- forward passes ------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(
        self, batch: Batch, temperature: float, micro_batch_size: int, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the response tokens under softmax(logits / T).  -> [B, R] each

        A sequence batch (``INPUT_IDS``) gets [B, L]: column t scores token t (0 at column 0).
        """
        self._require(value_head=False, what="compute_logprobs")
        self.model.eval()
        with self._no_grad_pass(batch, micro_batch_size) as micros:
            outs = [self._forward(mb, temperature, with_entropy) for mb in micros]
        logprobs = torch.cat([o[Keys.LOGPROBS] for o in outs]).float().cpu()  # [B, R]
        entropy = torch.cat([o[Keys.ENTROPY] for o in outs]).float().cpu() if with_entropy else None
        return logprobs, entropy

    @torch.no_grad()
    def compute_values(self, batch: Batch, micro_batch_size: int) -> torch.Tensor:
        """V(s_t) for each response token: the value head at the column before the token.  -> [B, R]"""
        self._require(value_head=True, what="compute_values")
        self.model.eval()
        with self._no_grad_pass(batch, micro_batch_size) as micros:
            outs = [self._forward(mb, 1.0, False) for mb in micros]
        return torch.cat([o[Keys.VALUES] for o in outs]).float().cpu()

    @torch.no_grad()
    def compute_sequence_scores(self, batch: Batch, micro_batch_size: int) -> torch.Tensor:
        """The head's output at the last real token of prompt + response (a reward model's score).  -> [B]

        The last real token is the response's last one up to its end (``RESPONSE_MASK``),
        the EOS when there is one; a row with an empty response is scored at its prompt's end.
        """
        self._require(value_head=True, what="compute_sequence_scores")
        self.model.eval()
        scores = []
        with self._no_grad_pass(batch, micro_batch_size) as micros:
            for micro in micros:
                inputs = model_inputs(micro.to(self.device), trim=False)
                scores.append(self._last_token_scores(inputs.input_ids, inputs.attention_mask))
        return torch.cat(scores).float().cpu()

    @torch.no_grad()
    def compute_pair_scores(self, pairs: Batch, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and the rejected sequences of preference pairs.  -> [B], [B]"""
        self._require(value_head=True, what="compute_pair_scores")
        self.model.eval()
        with self._no_grad_pass(pairs, micro_batch_size) as micros:
            outs = [self._pair_forward(micro.to(self.device)) for micro in micros]
        chosen = torch.cat([o[Keys.CHOSEN_SCORES] for o in outs]).float().cpu()  # [B]
        rejected = torch.cat([o[Keys.REJECTED_SCORES] for o in outs]).float().cpu()  # [B]
        return chosen, rejected

    def _pair_forward(self, micro: Batch) -> dict[str, torch.Tensor]:
        """Chosen and rejected sequences of a micro-batch of pairs in one forward.  -> {key: [b]}"""
        ids = torch.cat([micro[Keys.CHOSEN_IDS], micro[Keys.REJECTED_IDS]])  # [2b, L], right-padded
        mask = torch.cat([micro[Keys.CHOSEN_MASK], micro[Keys.REJECTED_MASK]]).long()  # [2b, L]
        chosen, rejected = self._last_token_scores(ids, mask).chunk(2)  # [b], [b]
        return {Keys.CHOSEN_SCORES: chosen, Keys.REJECTED_SCORES: rejected}

    def _last_token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value head at each row's last attended column.  [b, T] inputs -> [b] fp32"""
        return head_scores(self.model, self.layout.last_tokens(input_ids, attention_mask))[:, 0]  # [b]

    def _forward(self, micro: Batch, temperature: float, with_entropy: bool) -> dict[str, torch.Tensor]:
        """Per-token outputs of one micro-batch, zero after each response's end.  -> {key: [b, R]}

        A sequence batch (``INPUT_IDS``, SFT) gets [b, L]: column t holds the prediction of
        token t from tokens < t; column 0 has none and is 0, as is every padding column.
        """
        micro = micro.to(self.device)
        if Keys.INPUT_IDS in micro:
            self._require(value_head=False, what="forward on a sequence batch (INPUT_IDS)")
            inputs = self.layout.sequences(micro[Keys.INPUT_IDS], micro[Keys.ATTENTION_MASK])  # W = L - 1
            pad = (1, 0)
        else:
            inputs, width = self.layout.rollout(micro)  # W = R'
            pad = (0, width - inputs.valid.shape[1])
        if self.config.value_head:
            outputs = {Keys.VALUES: head_scores(self.model, inputs)}
        else:
            outputs = self.model.token_outputs(inputs, temperature, with_entropy, self.config.logits_chunk_size)
        return {k: F.pad(v, pad) for k, v in outputs.items()}  # [b, R] or [b, L]

    @torch.no_grad()
    def generate_greedy(
        self, prompts: Batch, max_new_tokens: int, eos_token_id: int, pad_token_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy responses of the training model to left-padded prompts.  -> ids, mask [B, N]

        For evaluation and for checking exported weights, not for rollouts (vLLM does
        those): it runs Hugging Face ``generate`` on the sharded model. Collective: ranks
        keep stepping until every rank is done (``synced_gpus``), so they may hold
        different prompts. ``N = max_new_tokens``; the mask is 1 up to the first EOS
        inclusive, the ids after it are ``pad_token_id``.
        """
        self._require(value_head=False, what="generate_greedy")
        self.model.eval()
        ids = prompts[Keys.PROMPT_IDS].to(self.device)  # [B, P]
        out = self.hf_model.generate(
            input_ids=ids,
            attention_mask=prompts[Keys.PROMPT_MASK].to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            synced_gpus=self.dp_size > 1,
            use_cache=True,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )[:, ids.shape[1] :].cpu()  # [B, n], n <= N
        is_eos = (out == eos_token_id).long()  # [B, n]
        mask = (is_eos.cumsum(dim=1) - is_eos) == 0  # [B, n]: before or at the first EOS
        out = torch.where(mask, out, pad_token_id)
        pad = max_new_tokens - out.shape[1]
        return F.pad(out, (0, pad), value=pad_token_id), F.pad(mask.float(), (0, pad))

    @contextlib.contextmanager
    def _no_grad_pass(self, batch: Batch, micro_batch_size: int) -> Iterator[list[Batch]]:
        """The micro-batches of a no-grad pass; with ``gather_once_for_inference`` each
        sharded module stays all-gathered after its first forward while they run.

        Then one all-gather per layer (and one for the root's embeddings, norm and head)
        serves every micro-batch of the pass; on exit every module is resharded and goes
        back to ``config.reshard_after_forward``, the value ``fully_shard`` was given.
        """
        micros = self._micro_batches(batch, micro_batch_size)
        if not self.config.gather_once_for_inference or len(micros) <= 1:
            yield micros
            return
        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]  # layers and root
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield micros
        finally:
            for module in modules:
                module.reshard()
                module.set_reshard_after_forward(self.config.reshard_after_forward, recurse=False)

    def _micro_batches(self, batch: Batch, micro_batch_size: int) -> list[Batch]:
        """``micro_batch_size`` rows each, or with ``max_tokens_per_micro_batch`` consecutive rows
        within that many real tokens, split further until every rank runs as many forwards
        as the busiest (FSDP2 would hang otherwise). Rows keep their order."""
        budget = self.config.max_tokens_per_micro_batch
        if budget > 0:
            tokens = row_tokens(batch).tolist()
            sizes = budget_sizes(tokens, budget)
            count = int(self._all_gather_floats([float(len(sizes))])[:, 0].max())
            sizes = split_to_count(tokens, sizes, count)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            return [batch[s : s + n] for s, n in zip(starts, sizes)]
        if micro_batch_size <= 0:
            raise ValueError(f"FSDPEngine: micro_batch_size={micro_batch_size} must be positive")
        micros = batch.split(micro_batch_size)
        counts = self._all_gather_floats([float(len(micros))])[:, 0]
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                f"FSDPEngine rank {self.dp_rank}: ranks hold different numbers of micro-batches "
                f"{counts.tolist()} (batch of {len(batch)}, micro_batch_size={micro_batch_size}); "
                "give every rank the same number of samples (pad the batch to a multiple of dp_size)"
            )
        return micros

    def _all_gather_floats(self, values: list[float]) -> torch.Tensor:
        """Each rank's ``values`` as rows of a [world, len(values)] float64 tensor."""
        local = torch.tensor(values, dtype=torch.float64, device=self.device)  # [n]
        rows = [torch.empty_like(local) for _ in range(self.dp_size)]
        dist.all_gather(rows, local)
        return torch.stack(rows).cpu()  # [W, n]

    def _require(self, value_head: bool, what: str) -> None:
        if self.config.value_head != value_head:
            kind = "a critic (value_head=True)" if self.config.value_head else "a policy (value_head=False)"
            raise RuntimeError(f"FSDPEngine.{what}: this engine holds {kind}")

    # ---- training --------------------------------------------------------------
    def train_step(
        self,
        batch: Batch,
        loss_fn: LossFn,
        micro_batch_size: int,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> dict[str, float]:
        """One optimizer step on this rank's mini-batch: ``accumulate_gradients`` then ``optimizer_step``."""
        metrics = self.accumulate_gradients(batch, loss_fn, micro_batch_size, temperature, with_entropy)
        metrics.update(self.optimizer_step())
        return metrics

    def accumulate_gradients(
        self,
        batch: Batch,
        loss_fn: LossFn,
        micro_batch_size: int,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> dict[str, float]:
        """Forward and backward over the micro-batches of this rank's mini-batch.

        ``loss_fn(micro, out, norm)`` gets the micro-batch (on the engine's device), the
        forward outputs (``Keys.LOGPROBS`` [+ ``Keys.ENTROPY``] or ``Keys.VALUES``, [b, R],
        zero after each response; for a batch of preference pairs ``Keys.CHOSEN_SCORES``
        and ``Keys.REJECTED_SCORES``, [b], with ``norm.global_seqs`` the number of pairs)
        and the global counts, and returns (loss already
        divided by a global count, metrics). Afterwards each parameter's gradient is
        the gradient of the global loss, the sum of the loss over micro-batches and
        ranks. Returns that global loss and the metrics over micro-batches: the mean,
        the max of a ``*_max`` metric, the min of a ``*_min`` one (``reduce_metric``).
        """
        self.model.train()
        micros = self._micro_batches(batch, micro_batch_size)
        counts = self._all_gather_floats(list(_loss_counts(batch)))
        norm = Normalizer(global_tokens=float(counts[:, 0].sum()), global_seqs=float(counts[:, 1].sum()))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        metric_parts: dict[str, list[torch.Tensor | float]] = {}
        for micro in micros:
            micro = micro.to(self.device)
            pairs = Keys.CHOSEN_IDS in micro
            out = self._pair_forward(micro) if pairs else self._forward(micro, temperature, with_entropy)
            loss, metrics = loss_fn(micro, out, norm)
            (loss * self.dp_size).backward()  # FSDP2's reduce-scatter divides by dp_size again
            loss_sum += loss.detach().double()
            for key, value in metrics.items():  # kept on the device: one sync per key at the end
                value = value.detach() if isinstance(value, torch.Tensor) else value
                metric_parts.setdefault(key, []).append(value)
        dist.all_reduce(loss_sum)
        result = {k: float(reduce_metric(k, parts)) for k, parts in metric_parts.items()}
        result["loss"] = float(loss_sum)
        return result

    def optimizer_step(self) -> dict[str, float]:
        """Clip by the global grad norm, step AdamW and the schedule; skip on a NaN/Inf norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in params if p.grad is not None], norm_type=2.0
        )
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            if self.config.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.config.optim.grad_clip, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": float(lr), "skipped": float(not finite)}

    # ---- weights out -----------------------------------------------------------
    def named_tensors(self, with_head: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, local shard or tensor) of everything the rollout engine loads.

        A tied weight appears once, under its first name; a critic's value head is left
        out unless ``with_head``. The order is the module order, which keeps each layer's
        tensors together. With LoRA the names are PEFT's (``.base_layer.``, ``.lora_A.``):
        ``full_tensors`` merges them back into the base model's.
        """
        tied = self._tied_aliases()
        for name, tensor in self.model.state_dict().items():
            if name in tied:
                continue  # the second name of a tied parameter
            if self.config.value_head and not with_head and name.startswith(VALUE_HEAD_PREFIX):
                continue
            yield name, tensor

    def _tied_aliases(self) -> set[str]:
        """The second (third, ...) names of tied parameters, e.g. ``lm_head.weight``."""
        first_names = {name for name, _ in self.model.named_parameters()}
        all_names = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        return all_names - first_names

    @torch.no_grad()
    def state_dict_stream(
        self, dtype: torch.dtype, bucket_bytes: int
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full tensors cast to ``dtype``, in buckets of about ``bucket_bytes``.

        Collective: every rank must drain the stream (each DTensor is all-gathered).
        Only the current bucket is held, so the extra memory is one bucket plus one tensor.
        Each shard is cast before the all-gather, so an fp32 model synced in bf16 moves
        half the bytes (a cast commutes with the gather: the result is the same).
        With LoRA each adapter is merged into its base weight (``full_tensors``).
        """
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, full in self.full_tensors(dtype):
            bucket.append((name, full))
            size += full.numel() * full.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def full_tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, full tensor in ``dtype``) of ``named_tensors``, one at a time (collective).

        With LoRA the names and weights are the base model's with each adapter merged in,
        ``W + s * B @ A`` (computed in fp32 from fp32 adapters, then cast to ``dtype``).
        """
        def gathered() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self.named_tensors():
                full = tensor if is_adapter_weight(name) else tensor.to(dtype)
                yield name, full.full_tensor() if isinstance(full, DTensor) else full

        if not self.lora_scales:
            return gathered()
        return merge_adapters(gathered(), self.lora_scales, dtype)

    def full_manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of each tensor ``full_tensors`` yields, in its order, gathering nothing
        (with LoRA: the base model's names, each adapter merged; worked out on the meta device)."""
        shapes = ((name, torch.empty(t.shape, device="meta")) for name, t in self.named_tensors())
        named = merge_adapters(shapes, self.lora_scales) if self.lora_scales else shapes
        return [(name, tuple(t.shape)) for name, t in named]

    @torch.no_grad()
    def adapter_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(PEFT's saved name, full fp32 tensor) of every LoRA adapter weight, nothing else
        (collective: every rank must drain it). What an adapter-only weight sync sends."""
        for name, tensor in self.named_tensors():
            if is_adapter_weight(name):
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                yield saved_name(name), full.float()

    # ---- checkpoints and memory ------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Model, optimizer and schedule with torch.distributed.checkpoint (one folder, all ranks).
        With LoRA only the adapters are saved: the frozen base is the model folder's, cast as
        at start (``frozen_dtype``), so a new engine holds it bitwise already."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._checkpoint_options)
        state = {"model": model_sd, "optim": optim_sd, "engine": self._engine_state()}
        dcp.save(state, checkpoint_id=str(path))

    def load(self, path: str | Path) -> None:
        """Restore what ``save`` wrote (same model and world size); a tampered ``.metadata`` is refused.
        With LoRA a checkpoint that also holds the base (an older one) loads too: only the adapters are read."""
        check_dcp_metadata(path)
        options = self._checkpoint_options
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=options)
        engine = self._engine_state()
        dcp.load({"model": model_sd, "optim": optim_sd, "engine": engine}, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
        self.scheduler.load_state_dict(engine["scheduler"])
        self.global_step = int(engine["global_step"])

    def save_hf(self, path: str | Path) -> None:
        """The full weights as a Hugging Face folder (config, safetensors, tokenizer); rank 0 writes.

        Collective (every rank all-gathers). The architecture written is the one whose
        weights these are: ``*ForSequenceClassification`` for a reward model (value head
        without bias), ``*ForTokenClassification`` for a critic, the source's for a policy,
        so ``AutoModelFor...`` (and this engine) load the folder back as it was.
        """
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dp_rank == 0:
            keep = {name for name, _ in self.named_tensors(with_head=True)}
            items: Iterable[tuple[str, torch.Tensor]] = ((k, v) for k, v in full.items() if k in keep)
            if self.lora_scales:  # the adapters merged in: a plain model of the base architecture
                items = merge_adapters(items, self.lora_scales, torch.float32)
            tensors = {k: v.contiguous() for k, v in items}  # a tied weight once
            os.makedirs(path, exist_ok=True)
            config = copy.deepcopy(self.model.config)
            config.architectures = [self._hf_architecture()]
            config.use_cache = True  # off while training; on for whoever loads the folder
            config.save_pretrained(path)
            save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            AutoTokenizer.from_pretrained(self.config.model_path).save_pretrained(path)
        dist.barrier()

    def _hf_architecture(self) -> str:
        from transformers.models.auto import modeling_auto

        model_type = self.model.config.model_type
        if not self.config.value_head:
            archs = self.model.config.architectures or [modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
            return str(archs[0])
        if self.config.head_bias:
            return str(modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES[model_type])
        return str(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type])

    @property
    def _checkpoint_options(self) -> StateDictOptions:
        """Checkpoints leave out frozen parameters (a LoRA run's base model); loading then sets only
        the saved ones (every one of them must be in the checkpoint: ``dcp.load`` refuses a missing key)."""
        adapters_only = bool(self.lora_scales)
        return StateDictOptions(ignore_frozen_params=adapters_only, strict=not adapters_only)

    def _engine_state(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(), "global_step": self.global_step}

    def offload(self) -> int:
        """Release the device memory of the parameters and optimizer state (their bytes wait in host
        memory, ``flowrl.engines.offload.HostCopy``) and drop the gradients; returns the bytes moved.
        Nothing may use the model or the optimizer until ``onload``. With ``cpu_offload`` the state
        already lives in host memory: only the gradients go."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.cpu_offload:
            return 0
        return self._host_copy.offload(self._state_tensors())

    def onload(self) -> None:
        """Bring back what ``offload`` released, bitwise (a no-op when nothing is offloaded)."""
        self._host_copy.onload()

    def _state_tensors(self) -> Iterator[torch.Tensor]:
        """This rank's shards of every parameter, and every optimizer state tensor but the step counts."""
        for p in self.model.parameters():
            yield p.to_local() if isinstance(p, DTensor) else p
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    yield value.to_local() if isinstance(value, DTensor) else value


def from_run_config(
    cfg: Any, model: Any, optim: Any | None, value_head: bool, head_bias: bool = True
) -> FSDPEngine:
    """The ``fsdp`` backend: an engine for the policy, the reference (``optim=None``), the critic
    or the reward model (``value_head`` without ``head_bias``), from the run config's sections."""
    optim_cfg, lora = OptimizerConfig(), LoraConfig()
    if optim is not None and not value_head:  # the policy: actor.lora applies
        lora = LoraConfig(**OmegaConf.to_container(cfg.actor.lora))  # type: ignore[arg-type]
    if optim is not None:
        fields = dict(optim)
        if fields["total_steps"] == 0:  # the schedule spans the run: steps x optimizer steps per step
            rollout_size = cfg.data.train_batch_size * cfg.rollout.n
            updates = cfg.actor.epochs * max(1, rollout_size // cfg.actor.mini_batch_size)
            fields["total_steps"] = cfg.trainer.total_steps * updates
        optim_cfg = OptimizerConfig(**fields)
    return FSDPEngine(
        FSDPEngineConfig(
            model_path=model.path,
            value_head=value_head,
            head_bias=head_bias,
            device=run_device(cfg),
            param_dtype=model.dtype,
            gradient_checkpointing=model.gradient_checkpointing,
            trim_padding=model.trim_padding,
            packing=model.packing,
            max_tokens_per_micro_batch=model.max_tokens_per_micro_batch,
            logits_chunk_size=model.logits_chunk_size,
            gather_once_for_inference=model.gather_once_for_inference,
            cpu_offload=model.cpu_offload,
            seed=cfg.trainer.seed,
            optim=optim_cfg,
            lora=lora,
            # the base under the adapters holds what vLLM serves; a frozen model, what it computes in
            frozen_dtype=cfg.rollout.dtype if lora.enabled else (model.dtype if optim is None else None),
        )
    )
