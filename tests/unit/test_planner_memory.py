"""The planner's memory model against peaks measured on CPU with the real FSDP2 engine.

One spawned process (world of one, gloo) builds ``FSDPEngine`` on a 4-layer tiny model, runs
the old-log-prob pass and two training steps (the second has its optimizer state already),
and measures, with torch's profiler (``profile_memory``), the most bytes allocated at once on
top of what existed before the call. The model's ``transient_bytes`` for the same layout must
match within the tolerance below, with and without gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from flowrl.planner.layout import Layout
from flowrl.planner.memory import Roles, Workload, transient_bytes
from flowrl.planner.shape import ModelShape
from tests.integration.multirank import run_plain

ROWS, PROMPT, RESPONSE = 8, 64, 32
LAYERS = 4


def allocated_peak(fn) -> int:
    """Most bytes held at once by the allocations ``fn`` makes (what existed before is not counted)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def batch(vocab: int):
    from flowrl.batch import Batch
    from flowrl.keys import Keys

    g = torch.Generator().manual_seed(0)
    return Batch(
        {
            Keys.PROMPT_IDS: torch.randint(3, vocab, (ROWS, PROMPT), generator=g),
            Keys.PROMPT_MASK: torch.ones(ROWS, PROMPT, dtype=torch.long),
            Keys.RESPONSE_IDS: torch.randint(3, vocab, (ROWS, RESPONSE), generator=g),
            Keys.RESPONSE_MASK: torch.ones(ROWS, RESPONSE),
        }
    )


def measure(model_dir: str) -> dict[str, int]:
    """Transient peaks of the engine's passes, with and without gradient checkpointing."""
    from flowrl.engines.fsdp import FSDPEngine, FSDPEngineConfig
    from flowrl.keys import Keys

    def loss_fn(micro, out, norm):
        loss = -(out[Keys.LOGPROBS] * micro[Keys.RESPONSE_MASK]).sum() / norm.global_tokens
        return loss, {}

    out = {}
    for checkpointing in (False, True):
        engine = FSDPEngine(FSDPEngineConfig(model_path=model_dir, gradient_checkpointing=checkpointing))
        data = batch(engine.hf_model.config.vocab_size)
        engine.train_step(data, loss_fn, ROWS)  # the optimizer state exists from here on
        tag = "ckpt" if checkpointing else "plain"
        out[f"update_{tag}"] = allocated_peak(lambda: engine.train_step(data, loss_fn, ROWS))
        out[f"old_logprobs_{tag}"] = allocated_peak(lambda: engine.compute_logprobs(data, 1.0, ROWS))
    return out


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from flowrl.models.tiny import TinyModelConfig, make_tiny_model

    folder = tmp_path_factory.mktemp("model") / "tiny4"
    make_tiny_model(folder, TinyModelConfig(num_hidden_layers=LAYERS), seed=0)
    return ModelShape.from_folder(folder), run_plain(measure, str(folder))


def predicted(shape: ModelShape, checkpointing: bool) -> dict[str, float]:
    w = Workload(prompts=ROWS, n=1, prompt_tokens=PROMPT, response_tokens=RESPONSE, max_prompt_tokens=PROMPT,
                 max_response_tokens=RESPONSE, mini_batch_size=ROWS)  # fmt: skip
    layout = Layout(num_workers=1, micro_batch_size=ROWS, gradient_checkpointing=checkpointing)
    return transient_bytes(shape, w, layout, Roles())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_peak_matches_measurement(measured, checkpointing):
    shape, peaks = measured
    got = peaks["update_ckpt" if checkpointing else "update_plain"]
    want = predicted(shape, checkpointing)["update"]
    # the model may overstate (it adds gradients to activations, which never peak together) but
    # not by much, and never understate by more than a little
    assert 0.85 * got <= want <= 1.35 * got, (want / 2**20, got / 2**20)


def test_checkpointing_saves_what_the_model_says(measured):
    shape, peaks = measured
    got = peaks["update_plain"] - peaks["update_ckpt"]
    want = predicted(shape, False)["update"] - predicted(shape, True)["update"]
    assert got > 0 and 0.7 * got <= want <= 1.3 * got, (want / 2**20, got / 2**20)


def test_no_grad_pass_peak_is_bounded_by_the_model(measured):
    shape, peaks = measured
    got, want = peaks["old_logprobs_plain"], predicted(shape, False)["old_logprobs"]
    assert 0.7 * got <= want <= 1.5 * got, (want / 2**20, got / 2**20)
