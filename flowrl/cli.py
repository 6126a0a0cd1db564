"""The ``flowrl`` command.

    flowrl quickstart [--seed S]                  SFT then GRPO on CPU in minutes (flowrl/quickstart.py)
    flowrl train RECIPE.yaml [key=value ...]      RL with a recipe (flowrl/config.py)
    flowrl sft [RECIPE.yaml] [key=value ...] [--model-path DIR --train-files F ...]
                                                  supervised fine-tuning (flowrl/drivers/sft.py)
    flowrl rm [RECIPE.yaml] [key=value ...] [--model-path DIR ...]
                                                  reward-model training (flowrl/drivers/reward_model.py)
    flowrl export SRC [--base DIR] [--out DIR] [--adapter]    a Hugging Face folder (or a LoRA adapter) from a checkpoint
    flowrl eval MODEL_DIR DATA [...]              accuracy of a model on RL rows (flowrl/evaluation.py)
    flowrl plot RUN_DIR [--out PNG]               curves of a run's metrics.jsonl (flowrl/plot.py)
    flowrl plan RECIPE.yaml [key=value ...] [--out FILE] [--fit RUN_DIR ...]
                                                  the fastest layout that fits in memory (flowrl/planner)

Mistakes in arguments end the command with one line on stderr naming the key, file or
value, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import inspect
import re
import sys
import typing
from typing import Any

from flowrl.config import ConfigError, load_config


class UsageError(ValueError):
    """A bad argument, file or value: reported as one line, exit status 2."""


def train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.print_config:  # validated above; nothing is started
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    from flowrl.drivers.registry import load_driver
    from flowrl.trainer.faults import run_training

    return run_training(load_driver(cfg.trainer.algorithm).main, cfg, UsageError)


def dataclass_from_recipe(args: argparse.Namespace, cls: type, flags: dict[str, Any]) -> Any:
    """``cls`` from ``[RECIPE.yaml] [key=value ...]`` plus the ``--flags`` given (flags win).

    Unknown keys and wrong types name the key; a missing required field exits like argparse.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flowrl.config import ConfigError, merge_recipe

    words = list(args.recipe_and_overrides)
    recipe = words.pop(0) if words and not _is_override(words[0]) else None
    bad = [w for w in words if not _is_override(w)]
    if bad:
        raise UsageError(f"{bad[0]!r}: give the recipe first, then key=value overrides")
    try:
        cfg = merge_recipe(OmegaConf.structured(cls), recipe, words)
        cfg = OmegaConf.merge(cfg, OmegaConf.create(flags))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except OmegaConfBaseException as e:
        raise UsageError(f"options: {str(e).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        options = ", ".join("--" + k.replace("_", "-") for k in missing)
        args.parser.error(f"the following arguments are required: {options} (or {missing[0]}: in a recipe)")
    return OmegaConf.to_object(cfg)


def _is_override(word: str) -> bool:
    return "=" in word and not word.endswith((".yaml", ".yml"))


def _given(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options given on the command line (defaults stay in the dataclass)."""
    ignore = {"command", "run", "parser", "recipe_and_overrides", *skip}
    return {k: v for k, v in vars(args).items() if k not in ignore}


def sft(args: argparse.Namespace) -> int:
    from flowrl.drivers.sft import SFTConfig, SFTDataError, train_sft

    try:
        cfg = dataclass_from_recipe(args, SFTConfig, _given(args))
    except ValueError as e:
        raise UsageError(str(e).removeprefix("sft: ")) from None
    try:
        result = train_sft(cfg)
    except SFTDataError as e:  # the data files, read before any worker starts
        raise UsageError(str(e)) from None
    print(" | ".join(f"{k}={v:.4g}" for k, v in result.items()))
    print(f"model: {cfg.out_dir}/model")
    return 0


RM_LOOP_FLAGS = ("save_every", "keep_last", "resume", "max_bad_steps")


def rm(args: argparse.Namespace) -> int:
    from flowrl.data.rows import RowError
    from flowrl.drivers.reward_model import RewardModelTrainConfig, run

    flags = _given(args, skip=("lr", *RM_LOOP_FLAGS))
    if "lr" in args:
        flags["optim"] = {"lr": args.lr}
    flags["loop"] = {k: getattr(args, k) for k in RM_LOOP_FLAGS if k in args}
    try:
        cfg = dataclass_from_recipe(args, RewardModelTrainConfig, flags)
        if not os.path.isdir(cfg.model_path):
            raise UsageError(f"--model-path {cfg.model_path}: no such folder (a Hugging Face model folder)")
        result = run(cfg)
    except (ValueError, FileNotFoundError, RowError) as e:
        raise UsageError(str(e)) from None
    print(" | ".join(f"{k}={v:.4g}" for k, v in result.items()))
    print(f"reward model: {cfg.out_dir}")
    return 0


def export(args: argparse.Namespace) -> int:
    from flowrl import export as ex

    try:
        if ex.is_step_folder(args.src):  # RUN_DIR/checkpoints/step_N: the policy, and the base it recorded
            checkpoint, recorded = ex.step_folder_parts(args.src)
            base = args.base or recorded
            out = args.out or os.path.join(args.src, "adapter" if args.adapter else "hf")
            if base is None or not ex.is_hf_folder(base):
                raise UsageError(
                    f"{args.src}: the run started from {recorded!r}, which is no Hugging Face folder here; "
                    "give --base (the model folder the run started from)"
                )
            meta = ex.recorded_meta(args.src)
            lora = meta.get("lora")
            folder = ex.export_checkpoint(checkpoint, base, out, lora=lora, adapter_only=args.adapter,
                                          base_dtype=meta.get("lora_base_dtype"))  # fmt: skip
        elif ex.is_training_checkpoint(args.src):
            if args.base is None or args.out is None:
                raise UsageError(
                    f"{args.src} is a training checkpoint: give --base (the model folder the run "
                    "started from) and --out (the folder to write)"
                )
            folder = ex.export_checkpoint(args.src, args.base, args.out, adapter_only=args.adapter)
        elif ex.is_hf_folder(args.src):
            if args.adapter:
                raise UsageError(f"--adapter: {args.src} is a Hugging Face folder; give a LoRA run's checkpoint step folder")
            folder = ex.copy_hf_folder(args.src, args.out) if args.out else args.src
        else:
            raise UsageError(
                f"{args.src}: neither a Hugging Face folder (config.json), a checkpoint step folder "
                f"(driver.json + actor/) nor a training checkpoint ({ex.DCP_METADATA})"
            )
        print(ex.verify_adapter_folder(folder) if args.adapter else ex.verify_hf_folder(folder).line())
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from flowrl.data.rows import RowError
    from flowrl.evaluation import EvalConfig, evaluate_model, settings_of_run

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run", "like_run")}
    try:
        if getattr(args, "like_run", None):  # the run's settings; options given here still win
            fields = settings_of_run(args.like_run) | fields
        cfg = EvalConfig(**fields)
        result = evaluate_model(cfg)
    except (ValueError, FileNotFoundError, RowError) as e:
        raise UsageError(str(e)) from None
    print(result.line())
    if cfg.out:
        print(f"samples: {cfg.out}")
    return 0


def plot(args: argparse.Namespace) -> int:
    from flowrl.plot import PlotError, plot_run

    try:
        out, skipped = plot_run(args.run_dir, args.out, args.keys)
    except PlotError as e:
        raise UsageError(str(e)) from None
    if skipped and args.keys:  # the defaults cover RL and SFT runs: only asked-for keys are news
        print(f"not in metrics.jsonl, skipped: {' '.join(skipped)}", file=sys.stderr)
    print(out)
    return 0


def plan(args: argparse.Namespace) -> int:
    from flowrl.planner import NoPlanFits
    from flowrl.planner import plan as make_plan
    from flowrl.planner.fit import compare, fit_overheads

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.fit:
            fitted, path = fit_overheads(args.fit, refresh=args.refresh)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in fitted.overheads.items())
            print(f"overheads fitted from {len(args.fit)} run(s) into {path}: {shown} s")
        result = make_plan(cfg, refresh=args.refresh and not args.fit)
    except (ConfigError, NoPlanFits, ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    c = result.coefficients
    source = f"fitted from {len(c.fitted_from)} run(s)" if c.fitted_from else "default overheads (not fitted: see --fit)"
    profiled = f"profiled now in {result.calibration_s:.1f} s" if result.calibration_s else "cached"
    print(f"calibration: {result.calibration_file} ({profiled}; {source})")
    print(f"{result.considered} valid layouts, {result.rejected_for_memory} rejected by the memory model; "
          f"predicted seconds per step and stage:")  # fmt: skip
    print(result.table(args.top))
    print("overrides: " + " ".join(result.chosen.layout.overrides()))
    if args.out:
        write_overrides(args.out, result.chosen.layout.overrides())
        print(f"written: {args.out}")
    for run_dir in args.compare or []:
        rows = compare(run_dir)
        print(f"{run_dir}: " + ", ".join(f"{k} {v['predicted']:.3f}/{v['measured']:.3f}" for k, v in rows.items())
              + " s (predicted/measured)")  # fmt: skip
    return 0


def write_overrides(path: str, overrides: list[str]) -> None:
    """The overrides as a YAML recipe fragment (``.yaml``/``.yml``) or one ``key=value`` a line."""
    from omegaconf import OmegaConf

    if path.endswith((".yaml", ".yml")):
        OmegaConf.save(OmegaConf.from_dotlist(overrides), path)
        return
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in overrides)


def add_plan_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="the fastest layout of a recipe that fits in memory: flowrl plan RECIPE.yaml [key=value ...]",
        description="Predict each layout's step time (seconds per stage) and peak memory per device from "
        "the model shape and a micro-profile of this machine (cached), and print the fastest layout that fits "
        "with the runners-up (docs/planner.md). trainer.plan=auto does the same when a run starts.",
    )
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. actor.model.path=DIR")
    p.add_argument("--out", metavar="FILE", help="write the chosen overrides: YAML for *.yaml, else key=value lines")
    p.add_argument("--top", type=int, default=6, help="plans in the table (default: 6)")
    p.add_argument(
        "--fit", nargs="+", metavar="RUN_DIR",
        help="first fit the per-stage runtime overheads from these runs (same machine and model) into the cache",
    )  # fmt: skip
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="print runs' predicted vs measured stage seconds")
    p.add_argument("--refresh", action="store_true", help="profile this machine again instead of using the cache")
    p.set_defaults(run=plan)


# ---- building the parser -----------------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field of a dataclass's source: its --help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+): [^#\n]*#\s*(.+)$", re.MULTILINE)
    return {name: text.strip() for name, text in pattern.findall(source)}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per field; only the options given reach the dataclass.

    Defaults stay in the dataclass (shown in --help); bools get ``--x/--no-x``, lists take
    one or more values.
    """
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        optional = [a for a in typing.get_args(kind) if a is not type(None)]
        if type(None) in typing.get_args(kind) and len(optional) == 1:
            kind = optional[0]  # `str | None`: the flag takes a str; leaving it out keeps None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = comments.get(f.name, "")
        if not required:
            help_text = f"{help_text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0], metavar="X")
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def add_recipe_arguments(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "recipe_and_overrides", nargs="*", metavar="[RECIPE.yaml] [key=value ...]",
        help=f"a YAML of the options below (field names as keys), then key=value overrides; the options "
        f"given as flags win. E.g. flowrl {command} my_{command}.yaml steps=200",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from flowrl.drivers.sft import SFTConfig

    parser = argparse.ArgumentParser(prog="flowrl", description="Reinforcement learning for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("quickstart", help="SFT then GRPO a tiny model on arithmetic, on CPU (see --help)", add_help=False)
    p = sub.add_parser(
        "train",
        help="run a recipe: flowrl train RECIPE.yaml [key=value ...]",
        description="Run an RL recipe. Every key, its default and its meaning: docs/recipes.md (generated "
        "from flowrl/config.py); --print-config shows the values a command line resolves to.",
    )
    p.add_argument("recipe", help="a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.total_steps=3")
    p.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config (recipe + overrides + defaults, validated) as YAML and exit 0 "
        "without starting anything; the output is itself a recipe",
    )  # fmt: skip
    p.set_defaults(run=train)

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on prompt/response rows",
        description="Fine-tune a Hugging Face causal LM on SFT rows; writes OUT_DIR/model (a Hugging Face "
        "folder), OUT_DIR/metrics.jsonl and OUT_DIR/samples.jsonl.",
    )
    add_recipe_arguments(p, "sft")
    p.set_defaults(run=sft, parser=p)
    add_dataclass_arguments(p, SFTConfig)

    p = sub.add_parser(
        "rm",
        help="train a reward model on preference pairs (Bradley-Terry)",
        description="Train a scalar-head reward model on rows with prompt, chosen and rejected; writes "
        "OUT_DIR (a Hugging Face sequence-classification folder) and its metrics.jsonl.",
    )
    add_recipe_arguments(p, "rm")
    p.add_argument("--model-path", dest="model_path", default=argparse.SUPPRESS, help="the model folder to start from")
    p.add_argument("--train-files", dest="train_files", nargs="+", default=argparse.SUPPRESS, metavar="X")
    p.add_argument("--val-files", dest="val_files", nargs="+", default=argparse.SUPPRESS, metavar="X")
    p.add_argument("--out-dir", dest="out_dir", default=argparse.SUPPRESS)
    for name, kind in (("steps", int), ("batch_size", int), ("lr", float), ("num_workers", int), ("seed", int),
                       ("save_every", int), ("keep_last", int), ("resume", str), ("max_bad_steps", int)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=argparse.SUPPRESS,
                       help="(default: see flowrl/drivers/reward_model.py)")
    p.set_defaults(run=rm, parser=p)

    p = sub.add_parser(
        "export",
        help="write or check a Hugging Face folder",
        description="From a training checkpoint (with --base and --out) or a Hugging Face folder (copied "
        "with --out): write the folder and check that transformers loads it.",
    )
    p.add_argument(
        "src",
        help="a run's checkpoint step folder (RUN_DIR/checkpoints/step_N), a training checkpoint folder "
        "(with .metadata) or a Hugging Face model folder",
    )
    p.add_argument(
        "--base",
        help="checkpoints: the model folder training started from (config, tokenizer); a step folder "
        "records it, so there it is optional",
    )
    p.add_argument("--out", help="the Hugging Face folder to write (a step folder: default STEP/hf)")
    p.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run: write its adapters alone, in PEFT's format (adapter_config.json + "
        "adapter_model.safetensors), instead of the base model with the adapters merged in",
    )
    p.set_defaults(run=export)
    add_eval_parser(sub)
    add_plot_parser(sub)
    add_plan_parser(sub)
    return parser


def add_eval_parser(sub: Any) -> None:
    from flowrl.evaluation import EvalConfig

    p = sub.add_parser(
        "eval",
        help="accuracy of a model folder on RL rows, scored by the rule rewards",
        description="Generate with vLLM in this process (greedy by default) for each prompt of the RL rows "
        "(prompt, data_source, reward_model.ground_truth) and score the responses with the rule reward of "
        "each data_source. Prints accuracy (score >= 1), mean score and, with --n > 1, pass@n; the same "
        "numbers as a training run's val/accuracy for the same model, data and lengths.",
    )
    p.add_argument("model_path", metavar="MODEL_DIR", help="a Hugging Face model folder (config.json)")
    p.add_argument("data_files", metavar="DATA", nargs="+", help="parquet/JSONL files of RL rows")
    p.add_argument(
        "--like-run", metavar="RUN_DIR", default=argparse.SUPPRESS,
        help="take the response and prompt lengths, val_max_samples and reward settings of a training run "
        "(RUN_DIR/config.yaml), so that accuracy equals its val/accuracy; options given here win",
    )  # fmt: skip
    comments = field_comments(EvalConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    metavars = {"dtype": "DTYPE", "reward_function": "PKG.MODULE:FN", "out": "FILE.jsonl"}
    for name, kind in (
        ("max_samples", int), ("max_new_tokens", int), ("max_prompt_length", int), ("temperature", float),
        ("n", int), ("seed", int), ("dtype", str), ("reward_function", str), ("out", str), ("prompt_key", str),
        ("ground_truth_key", str), ("data_source", str),
    ):  # fmt: skip
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=argparse.SUPPRESS,
            metavar=metavars.get(name, kind.__name__.upper()),
            help=f"{comments.get(name, '')} (default: {defaults[name]})",
        )  # fmt: skip
    p.set_defaults(run=evaluate)


def add_plot_parser(sub: Any) -> None:
    from flowrl.plot import DEFAULT_KEYS

    p = sub.add_parser(
        "plot",
        help="PNG curves of a run's metrics.jsonl",
        description="Draw the main curves of RUN_DIR/metrics.jsonl (RL and SFT runs), one small panel per "
        "metric against the step; metrics the run did not log are skipped.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with metrics.jsonl")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/metrics.png)")
    p.add_argument(
        "--keys", nargs="+", default=None, metavar="KEY",
        help=f"metrics to draw, in order (default: {' '.join(DEFAULT_KEYS)})",
    )  # fmt: skip
    p.set_defaults(run=plot)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quickstart"]:  # its own parser: flowrl.quickstart
        from flowrl.quickstart import main as quickstart

        try:
            return quickstart(argv[1:])
        except ValueError as e:
            print(f"flowrl quickstart: {str(e).removeprefix('quickstart: ')}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as e:
        print(f"flowrl {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
