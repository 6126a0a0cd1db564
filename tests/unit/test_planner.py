"""The planner's shape, cost model and search, without profiling or workers.

Coefficients here are fixed numbers (no profile); the property test draws random recipes and
devices and checks that every plan the search returns fits the memory model and loads through
``flowrl.config`` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from flowrl.config import load_config
from flowrl.planner import Layout, NoPlanFits, plan
from flowrl.planner.calibrate import cache_path, save
from flowrl.planner.cost import Coefficients, forward_flops, predict
from flowrl.planner.memory import Device, memory_errors
from flowrl.planner.search import search, setting_of
from flowrl.planner.shape import ModelShape

RECIPE = "recipes/grpo_arithmetic_tiny.yaml"
GPU_80 = Device(use_gpu=True, count=8, memory_gib=80.0)
COEFFICIENTS = Coefficients(
    fwd_call_s=1e-3, fwd_s_per_flop=1e-14, train_call_s=2e-3, train_s_per_flop=1e-14, optim_s_per_param=1e-11,
    decode_step_s=5e-3, decode_s_per_seq=1e-5, decode_s_per_byte=5e-13, copy_s_per_byte=1e-11,
)  # fmt: skip


def shape_folder(tmp_path, name: str):
    """A folder with only the config.json of a Qwen2.5 shape (the planner reads nothing else)."""
    from flowrl.models.shapes import qwen25_config

    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    qwen25_config(name).to_json_file(folder / "config.json")
    return folder


def recipe(model, *overrides: str):
    return load_config(RECIPE, [f"actor.model.path={model}", "data.train_files=[unused.parquet]", *overrides])


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b"])
def test_parameter_count_matches_transformers(tmp_path, name):
    from flowrl.models.shapes import parameter_count

    assert ModelShape.from_folder(shape_folder(tmp_path, name)).params == parameter_count(name)


def test_tiny_parameter_count_and_flops(tmp_path):
    from flowrl.models.tiny import make_tiny_model

    model, _ = make_tiny_model(tmp_path / "tiny")
    shape = ModelShape.from_folder(tmp_path / "tiny")
    assert shape.params == sum(p.numel() for p in model.parameters())
    # short context, head on every token: ~2 FLOPs per weight per token (Kaplan et al.)
    # (the embedding is a lookup and the final norm no matmul: the untied head and the layers are)
    assert not shape.tied_embeddings
    assert forward_flops(shape, 10, 0, 10) == 2 * 10 * (shape.params - shape.embedding_params - shape.hidden)


def test_layout_overrides_round_trip(tmp_path):
    folder = shape_folder(tmp_path, "qwen2.5-0.5b")
    layout = Layout(num_workers=4, micro_batch_size=2, gradient_checkpointing=True, offload=True, gpu_memory_utilization=0.7)
    assert Layout.of(recipe(folder, *layout.overrides())) == layout


def random_case(rng: random.Random, tmp_path):
    name = rng.choice(["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
    mini = rng.choice([4, 8, 16, 32])
    overrides = [
        f"actor.mini_batch_size={mini}", f"actor.micro_batch_size={rng.choice([m for m in (1, 2, 4) if mini % m == 0])}",
        f"data.train_batch_size={mini}", f"rollout.n={rng.choice([2, 4])}", "trainer.num_workers=1",
        f"rollout.max_response_length={rng.choice([64, 512, 4096])}",
        f"data.prompts.max_prompt_length={rng.choice([64, 1024])}", f"placement.max_staleness={rng.choice([0, 0, 2])}",
        f"actor.model.dtype={rng.choice(['float32', 'bfloat16'])}", "algorithm.advantage.estimator=grpo",
    ]  # fmt: skip
    if "max_staleness=2" in overrides[7]:
        overrides.append("placement.rollout_workers=1")
    gpus = rng.choice([1, 2, 4, 8])
    device = Device(use_gpu=True, count=gpus, memory_gib=rng.choice([24.0, 80.0, 141.0]))
    if rng.random() < 0.3:
        device = Device(use_gpu=False, count=rng.choice([2, 4, 16]), memory_gib=rng.choice([8.0, 64.0]), cpu_kv_cache_gib=1.0)
    return recipe(shape_folder(tmp_path, name), *overrides), device


def test_search_never_returns_a_plan_the_memory_model_or_the_config_rejects(tmp_path):
    rng = random.Random(0)
    returned = rejected = 0
    for _ in range(10):
        cfg, device = random_case(rng, tmp_path)
        setting = setting_of(cfg, device, prompt_tokens=50.0)
        plans, _, considered, n_rejected, _ = search(cfg, setting, COEFFICIENTS)
        rejected += n_rejected
        assert considered == len(plans) + n_rejected
        for p in plans:
            _, errors = memory_errors(setting.shape, setting.workload, p.layout, setting.roles, device)
            assert errors == [], (p.layout, errors)
            assert p.peak_gib <= 0.9 * device.memory_gib
        for p in plans[:2] + rng.sample(plans, min(3, len(plans))):  # config validation is slower: a sample
            loaded = recipe(cfg.actor.model.path, *overrides_of(cfg), *p.layout.overrides())
            assert Layout.of(loaded) == p.layout
        assert [p.seconds["step"] for p in plans] == sorted(p.seconds["step"] for p in plans)
        returned += len(plans)
    assert returned > 100 and rejected > 100, (returned, rejected)  # the cases exercise both sides of the memory model


def overrides_of(cfg) -> list[str]:
    """The non-layout settings of a drawn case, as overrides (so reloading keeps them)."""
    keys = ["actor.mini_batch_size", "data.train_batch_size", "rollout.n", "rollout.max_response_length",
            "data.prompts.max_prompt_length", "placement.max_staleness", "actor.model.dtype"]  # fmt: skip
    from omegaconf import OmegaConf

    return [f"{k}={OmegaConf.select(cfg, k)}" for k in keys]


def test_7b_needs_several_gpus_and_says_so_when_it_cannot_fit(tmp_path):
    folder = shape_folder(tmp_path, "qwen2.5-7b")
    cfg = recipe(folder, "actor.mini_batch_size=16", "actor.micro_batch_size=4", "data.train_batch_size=8", "rollout.n=4")
    setting = setting_of(cfg, GPU_80, prompt_tokens=100.0)
    plans, *_ = search(cfg, setting, COEFFICIENTS)
    assert plans and min(p.layout.num_workers for p in plans) >= 2  # 16 bytes x 7.6e9 parameters on one GPU: no
    one_gpu = dataclasses.replace(GPU_80, count=1)
    with pytest.raises(NoPlanFits, match=r"smallest predicted peak .* GiB per GPU, 90% of 80.00 GiB available"):
        plan(cfg, device=one_gpu, prompt_tokens=100.0)


def test_cost_model_scales_and_orders(tmp_path):
    folder = shape_folder(tmp_path, "qwen2.5-1.5b")
    cfg = recipe(folder, "actor.mini_batch_size=16", "data.train_batch_size=8", "rollout.n=4", "rollout.max_response_length=512")
    c = dataclasses.replace(COEFFICIENTS, overheads={k: 0.0 for k in COEFFICIENTS.overheads})
    s = setting_of(cfg, GPU_80, prompt_tokens=200.0, response_tokens=400.0)
    base = Layout(num_workers=2, micro_batch_size=4)
    p = predict(s, base, c)
    assert predict(s, dataclasses.replace(base, gradient_checkpointing=True), c)["update"] > p["update"]
    assert predict(s, dataclasses.replace(base, num_workers=4), c)["update"] < p["update"]
    assert predict(s, dataclasses.replace(base, offload=True), c)["generate"] > p["generate"]
    longer = setting_of(cfg, GPU_80, prompt_tokens=200.0, response_tokens=800.0)
    assert predict(longer, base, c)["generate"] > 1.8 * p["generate"]
    # compute-bound passes: twice the prompts, about twice the seconds
    bigger = dataclasses.replace(s, workload=dataclasses.replace(s.workload, prompts=16))
    no_calls = dataclasses.replace(c, fwd_call_s=0.0, train_call_s=0.0, collective_s=0.0, collective_s_per_byte=0.0)
    assert predict(bigger, base, no_calls)["old_logprobs"] == pytest.approx(2 * predict(s, base, no_calls)["old_logprobs"], rel=1e-6)
    assert p["step"] == pytest.approx(sum(v for k, v in p.items() if k != "step"))


def test_async_split_overlaps_generation_with_training(tmp_path):
    folder = shape_folder(tmp_path, "qwen2.5-0.5b")
    cfg = recipe(folder, "placement.max_staleness=1", "placement.rollout_workers=1", "trainer.num_workers=2")
    s = setting_of(cfg, dataclasses.replace(GPU_80, count=4), prompt_tokens=50.0)
    sync, overlap = Layout(num_workers=2, rollout_workers=1), Layout(num_workers=2, rollout_workers=1, max_staleness=1)
    a, b = predict(s, sync, COEFFICIENTS), predict(s, overlap, COEFFICIENTS)
    assert b["step"] == pytest.approx(max(b["generate"], sum(v for k, v in b.items() if k not in ("generate", "step"))))
    assert b["step"] < a["step"]


def test_planned_config_applies_the_plan_and_records_it(tmp_path, monkeypatch):
    from flowrl.models.tiny import make_tiny_model
    from flowrl.planner.startup import planned_config
    from flowrl.tasks.arithmetic import write_splits

    monkeypatch.setenv("FLOWRL_PLANNER_CACHE", str(tmp_path / "cache"))
    make_tiny_model(tmp_path / "m")
    data = write_splits(tmp_path / "data", n_train=16, n_test=4, level=1, seed=0)
    overrides = [f"actor.model.path={tmp_path / 'm'}", f"data.train_files=[{data['train']}]",
                 f"trainer.run_dir={tmp_path / 'run'}", "trainer.quiet=true"]  # fmt: skip
    off = load_config(RECIPE, overrides)
    assert planned_config(off) == (off, {})
    cfg = load_config(RECIPE, overrides + ["trainer.plan=auto"])
    shape = ModelShape.from_folder(tmp_path / "m")
    save(dataclasses.replace(COEFFICIENTS, fwd_call_s=0.5), cache_path(shape, "float32", False))  # no profile here
    new, metrics = planned_config(cfg)
    recorded = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert Layout.of(new) == Layout(**recorded["chosen"]["layout"])
    assert metrics == {f"plan/predicted_{k}_s": v for k, v in recorded["chosen"]["predicted_s"].items()}
    assert "plan/predicted_step_s" in metrics and "plan/predicted_update_s" in metrics
    assert recorded["alternatives"] and recorded["chosen"]["predicted_s"]["step"] <= recorded["alternatives"][0]["predicted_s"]["step"]
    # a resumed run keeps the recorded layout even if the coefficients changed since
    save(dataclasses.replace(COEFFICIENTS, train_call_s=9.0), cache_path(shape, "float32", False))
    resumed, _ = planned_config(load_config(RECIPE, overrides + ["trainer.plan=auto", "trainer.resume=auto"]))
    assert Layout.of(resumed) == Layout.of(new)


def test_profile_is_cached_and_positive(tmp_path, monkeypatch):
    from flowrl.planner.calibrate import load_or_profile

    monkeypatch.setenv("FLOWRL_PLANNER_CACHE", str(tmp_path))
    shape = ModelShape(layers=1, hidden=64, intermediate=128, heads=1, kv_heads=1, head_dim=64, vocab=128, tied_embeddings=True)
    threads = torch.get_num_threads()
    first, path, profiled = load_or_profile(shape, "float32", False)
    assert profiled and path.is_file() and torch.get_num_threads() == threads
    assert first.fwd_s_per_flop > 0 or first.fwd_call_s > 0
    assert first.decode_step_s > 0 and first.copy_s_per_byte > 0 and first.optim_s_per_param > 0
    again, _, profiled_again = load_or_profile(shape, "float32", False)
    assert not profiled_again and again == first


def fake_run(run_dir, cfg, layout: Layout, seconds: dict[str, float]) -> None:
    """A run directory as flowrl train leaves it: config.yaml and three steps of timings."""
    from omegaconf import OmegaConf

    run_dir.mkdir(parents=True)
    OmegaConf.save(recipe(cfg.actor.model.path, *layout.overrides()), run_dir / "config.yaml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            timings = {f"timing/{k}": v * (3.0 if step == 1 else 1.0) for k, v in seconds.items()}  # step 1 warms up
            f.write(json.dumps({"step": step, **timings, "timing/step": sum(timings.values())}) + "\n")


def test_overheads_fitted_per_process_class(tmp_path, monkeypatch):
    from flowrl.planner.fit import compare, fit_overheads

    monkeypatch.setenv("FLOWRL_PLANNER_CACHE", str(tmp_path / "cache"))
    cfg = recipe(shape_folder(tmp_path, "qwen2.5-0.5b"))
    shape = ModelShape.from_folder(cfg.actor.model.path)
    save(COEFFICIENTS, cache_path(shape, "float32", False))
    one, two = Layout(num_workers=1, micro_batch_size=8), Layout(num_workers=2, micro_batch_size=8)
    stages = ("generate", "reward", "old_logprobs", "update", "weight_sync")
    fake_run(tmp_path / "w1", cfg, one, dict(zip(stages, (100.0, 1.0, 50.0, 200.0, 10.0))))
    fake_run(tmp_path / "w2", cfg, two, dict(zip(stages, (60.0, 1.0, 30.0, 100.0, 20.0))))
    fitted, _ = fit_overheads([str(tmp_path / "w1"), str(tmp_path / "w2")])
    # each fitted layout's prediction is its measured median (steps from 2 on), stage by stage
    for name, seconds in (("w1", (100.0, 1.0, 50.0, 200.0, 10.0)), ("w2", (60.0, 1.0, 30.0, 100.0, 20.0))):
        rows = compare(str(tmp_path / name))
        for stage, want in zip(stages, seconds):
            assert rows[stage]["measured"] == want
            assert rows[stage]["predicted"] == pytest.approx(want, rel=1e-6)
    # a class no run had (4 ranks) gets the mean of the two runs' overheads
    assert fitted.overheads_for(Layout(num_workers=4))["update"] == pytest.approx(
        (fitted.overheads_for(one)["update"] + fitted.overheads_for(two)["update"]) / 2
    )


def test_per_micro_batch_cost_is_split_off_when_micro_batching_differs(tmp_path, monkeypatch):
    from flowrl.planner.cost import stage_micro_batches
    from flowrl.planner.fit import fit_overheads

    monkeypatch.setenv("FLOWRL_PLANNER_CACHE", str(tmp_path / "cache"))
    cfg = recipe(shape_folder(tmp_path, "qwen2.5-0.5b"))
    shape = ModelShape.from_folder(cfg.actor.model.path)
    save(COEFFICIENTS, cache_path(shape, "float32", False))
    bare = dataclasses.replace(COEFFICIENTS, overheads={k: 0.0 for k in COEFFICIENTS.overheads})
    setting = setting_of(cfg)
    layouts = [Layout(num_workers=1, micro_batch_size=m) for m in (4, 8, 16)]
    for i, layout in enumerate(layouts[:2]):  # measured: compute + 3 s + 0.5 s per micro-batch of the update
        k = stage_micro_batches(setting, layout)["update"]
        compute = predict(setting, layout, bare)
        seconds = {s: compute[s] + (3.0 + 0.5 * k if s == "update" else 1.0) for s in setting.stages}
        fake_run(tmp_path / f"r{i}", cfg, layout, seconds)
    fitted, _ = fit_overheads([str(tmp_path / "r0"), str(tmp_path / "r1")])
    assert fitted.per_micro_for(layouts[2])["update"] == pytest.approx(0.5, rel=1e-4)
    k = stage_micro_batches(setting, layouts[2])["update"]
    got = predict(setting, layouts[2], fitted)["update"] - predict(setting, layouts[2], bare)["update"]
    assert got == pytest.approx(3.0 + 0.5 * k, rel=1e-4)  # a micro-batching no run had


def test_plan_command_bad_input_is_one_line(tmp_path, capsys):
    from flowrl.cli import main

    assert main(["plan", "recipes/no_such.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "flowrl plan: recipe recipes/no_such.yaml: no such file"
    big = shape_folder(tmp_path, "qwen2.5-7b")  # ~120 GB of fp32 training state, and 2M-token prompts
    args = [f"actor.model.path={big}", "data.train_files=[unused.parquet]", "data.prompts.max_prompt_length=2000000"]
    assert main(["plan", RECIPE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowrl plan: no plan fits in memory: the smallest predicted peak of")
    assert "GiB of host memory" in err and "GiB available" in err


def test_cpu_offload_lets_7b_train_on_one_gpu_in_the_memory_model_not_on_the_host(tmp_path):
    from flowrl.planner.memory import stage_peaks

    folder = shape_folder(tmp_path, "qwen2.5-7b")
    base = ("actor.mini_batch_size=16", "actor.micro_batch_size=4", "data.train_batch_size=8", "rollout.n=4",
            "actor.model.dtype=bfloat16", "rollout.dtype=bfloat16", "actor.use_kl_loss=true", "trainer.num_workers=1")  # fmt: skip
    one_gpu = dataclasses.replace(GPU_80, count=1)
    layout = Layout.of(recipe(folder, *base))
    peaks = {}
    for offload in (False, True):
        cfg = recipe(folder, *base, f"actor.model.cpu_offload={str(offload).lower()}")
        s = setting_of(cfg, one_gpu, prompt_tokens=100.0)
        assert s.roles.cpu_offload == s.roles.ref_cpu_offload == offload  # no reference.path: the actor's model config
        peaks[offload] = stage_peaks(s.shape, s.workload, layout, s.roles, one_gpu)
        host = dataclasses.replace(one_gpu, use_gpu=False, memory_gib=1024.0)
        peaks[("host", offload)] = stage_peaks(s.shape, s.workload, layout, s.roles, host)
    params = s.shape.params
    # fp32 weights, gradients and two AdamW moments (16 bytes a parameter) and the bf16 reference leave the GPU
    assert peaks[False]["update"] - peaks[True]["update"] == pytest.approx((16 + 2) * params)
    assert peaks[False]["update"] > 80 * 2**30 > peaks[True]["update"]
    assert peaks[("host", False)] == peaks[("host", True)]  # on CPU the host holds it either way
    cfg = recipe(folder, *base, "actor.model.cpu_offload=true")
    plans, *_ = search(cfg, setting_of(cfg, one_gpu, prompt_tokens=100.0), COEFFICIENTS)
    assert plans  # without it, test_7b_needs_several_gpus... finds no plan on one GPU
