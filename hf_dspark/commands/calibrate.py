"""``hf-dspark calibrate``: fit Sequential Temperature Scaling of a drafter's confidence head on recorded rounds."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_dspark.decoding.calibration import (
    DEFAULT_BINS,
    DEFAULT_GRID,
    PLOT_NAME,
    REPORT_NAME,
    CalibrationData,
    build_report,
    collect_rounds,
    default_grid,
    fit_sts,
    format_report,
    plot_reliability,
    read_rounds_file,
)
from hf_dspark.errors import DataError, DSparkConfigError
from hf_dspark.commands import _args
from hf_dspark.commands.arguments import (
    DrafterArguments, OutputArguments, PromptArguments, SamplingArguments, TargetArguments, add_config_argument,
    add_dataclass_arguments, flag,
)


@dataclass
class CalibrateArguments:
    """How the confidence head is fitted and reported."""

    grid: list[float] = flag(list(DEFAULT_GRID), type=_args.finite_float, nargs=3, metavar=("MIN", "MAX", "POINTS"),
                             help="log-spaced temperature grid (default 0.05 20 241)")
    bins: int = flag(DEFAULT_BINS, type=_args.positive_int, help="ECE / reliability bins (default 15)")
    eval_fraction: float = flag(
        0.25, type=_args.fraction, help="share of the prompts held out from the fit; the report and the diagram are "
                                        "computed on them (default 0.25; 0 = fit and report on the same rounds)")
    report: str | None = flag(help=f"report JSON (default <output>/{REPORT_NAME})")
    rounds: str | None = flag(help="JSONL of recorded rounds, one line per prompt, appended as it goes; prompts "
                                   "already in it are not generated again")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-dspark calibrate``."""
    add_dataclass_arguments(parser, TargetArguments, ("target", "dtype", "device"), required=("target",))
    add_dataclass_arguments(parser, DrafterArguments, ("draft",), required=("draft",))
    add_dataclass_arguments(
        parser, PromptArguments, ("prompts", "split", "column", "max_prompts", "max_new_tokens", "max_prompt_tokens",
                                  "chat_template"),
        required=("prompts",), defaults={"max_prompts": 200, "max_prompt_tokens": 2048},
        overrides={"prompts": {"help": "held-out prompt files ({'turns': [...]} JSONL, a prepare-data "
                                       "holdout.jsonl) or Hub ids"},
                   "max_prompts": {"help": "prompts to run (default 200)"},
                   "max_prompt_tokens": {"help": "keep the last N prompt tokens (default 2048)"}})
    add_dataclass_arguments(parser, SamplingArguments, ("temperature", "top_p", "top_k", "seed"),
                            defaults={"temperature": 0.0},
                            overrides={"temperature": {"help": "sampling temperature; 0 = greedy (default)"}})
    add_dataclass_arguments(parser, CalibrateArguments)
    add_dataclass_arguments(parser, OutputArguments, ("output", "plot"), overrides={
        "output": {"help": "save the calibrated drafter here (default: update config.json of --draft in place)"},
        "plot": {"help": f"reliability diagram PNG (default <output>/{PLOT_NAME})"}})
    add_config_argument(parser)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_prompts", "max_new_tokens", "max_prompt_tokens", "bins"):
        if getattr(args, name) < 1:
            raise DSparkConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise DSparkConfigError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 <= args.eval_fraction < 1:
        raise DSparkConfigError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    low, high, points = args.grid
    if not (0 < low < high and points >= 2 and points == int(points)):
        raise DSparkConfigError(
            f"--grid {low:g} {high:g} {points:g} is invalid: use MIN MAX POINTS with 0 < MIN < MAX and an integer "
            "POINTS >= 2 (default 0.05 20 241)"
        )
    if args.output is None and not Path(args.draft).is_dir():
        raise DSparkConfigError(
            f"--draft {args.draft!r} is not a local folder, so it cannot be updated in place; pass --output DIR"
        )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``hf-dspark calibrate``."""
    from tqdm.auto import tqdm

    from hf_dspark.checkpoints.loading import load_drafter
    from hf_dspark.targets import load_target
    from hf_dspark.data.encoding import encode_prompt, resolve_chat_mode
    from hf_dspark.data.prompts import load_prompts

    _check_args(args)
    grid = default_grid(args.grid[0], args.grid[1], int(args.grid[2]))
    target, tokenizer = load_target(args.target, dtype=_args.resolve_target_dtype(args.dtype, args.device),
                                    device=args.device)
    draft = load_drafter(args.draft, target=target)  # placed where the target's embedding computes
    if args.output is None and draft.checkpoint_format != "hf-dspark":
        raise DSparkConfigError(
            f"--draft {args.draft} is a {draft.checkpoint_format} checkpoint; calibrating it in place would mix "
            "formats in one folder. Pass --output DIR (the calibrated drafter is written in hf-dspark's layout)"
        )
    if draft.confidence_head is None:
        raise DSparkConfigError(
            f"the drafter at {args.draft} has no confidence head (enable_confidence_head=False); nothing to calibrate"
        )
    prompts = load_prompts(
        args.prompts, split=args.split, column=args.column, num_prompts=args.max_prompts, seed=args.seed
    )
    chat = resolve_chat_mode(tokenizer, args.chat_template, draft.config.prompt_chat_template)
    sampling = {}
    if args.temperature > 0:
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
        sampling = {k: v for k, v in sampling.items() if v is not None}
        torch.manual_seed(args.seed)

    rounds_path = Path(args.rounds) if args.rounds else None
    done = read_rounds_file(rounds_path) if rounds_path else {}
    per_prompt: list[list[dict[str, Any]]] = []
    handle = None
    if rounds_path:
        rounds_path.parent.mkdir(parents=True, exist_ok=True)
        text = rounds_path.read_bytes() if rounds_path.exists() else b""
        handle = rounds_path.open("a", encoding="utf-8")
        if text and not text.endswith(b"\n"):  # an interrupted write: its partial line is skipped on reading
            handle.write("\n")
    accepted_tokens = 0
    try:
        bar = tqdm(prompts, desc="calibration rounds", unit="prompt")
        for prompt in bar:
            recorded = done.get(prompt["id"])
            if recorded is None:
                ids = encode_prompt(tokenizer, prompt["turns"][0], chat)[-args.max_prompt_tokens :]
                recorded = collect_rounds(
                    target, draft, ids, args.max_new_tokens, do_sample=args.temperature > 0, **sampling
                )
                if handle is not None:
                    handle.write(json.dumps({"id": prompt["id"], "rounds": recorded}) + "\n")
                    handle.flush()
            per_prompt.append(recorded)
            accepted_tokens += sum(r["accepted"] + 1 for r in recorded)
            n_rounds = sum(len(r) for r in per_prompt)
            if n_rounds:
                bar.set_postfix(rounds=n_rounds, tau=f"{accepted_tokens / n_rounds:.2f}")
    finally:
        if handle is not None:
            handle.close()

    # Hold out whole prompts (the list is already shuffled with --seed): fit on the rest, report on them.
    n_eval = 0
    if args.eval_fraction > 0 and len(per_prompt) >= 2:
        n_eval = min(len(per_prompt) - 1, max(1, round(args.eval_fraction * len(per_prompt))))
    block = draft.config.block_size
    fit_data = CalibrationData.from_rounds([r for p in per_prompt[: len(per_prompt) - n_eval] for r in p], block)
    eval_data = CalibrationData.from_rounds([r for p in per_prompt[len(per_prompt) - n_eval:] for r in p], block)
    if len(fit_data) == 0:
        raise DataError(
            "no verification rounds were recorded for the fit (every generation ended after one round); "
            "use more prompts or a larger --max-new-tokens"
        )
    data = eval_data if len(eval_data) else fit_data
    temperatures = fit_sts(fit_data.confidence_logits, fit_data.prefix_survived, grid=grid,
                           observed=fit_data.prefix_observed, n_bins=args.bins)

    previous = draft.config.confidence_temperatures
    draft.config.confidence_temperatures = temperatures
    output = Path(args.output) if args.output else Path(args.draft)
    if args.output:
        draft.save_pretrained(output)
    else:  # only the temperatures change: rewrite config.json, leave the weights alone
        draft.config.save_pretrained(output)

    fit_report = build_report(fit_data, temperatures, args.bins)
    report = build_report(
        data, temperatures, args.bins,
        target=args.target, draft=args.draft, output=str(output), prompts=len(prompts),
        max_new_tokens=args.max_new_tokens, sampling_temperature=args.temperature,
        previous_temperatures=previous,
        evaluated_on=("held-out prompts" if data is eval_data else "the fit prompts (no held-out rounds)"),
        eval_prompts=n_eval if data is eval_data else 0,
        fit={key: fit_report[key] for key in ("rounds", "mean_ece_before", "mean_ece_after")}
        | {"prompts": len(per_prompt) - n_eval},
    )
    report_path = Path(args.report) if args.report else output / REPORT_NAME
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"fit on {report['fit']['prompts']} prompts ({report['fit']['rounds']} rounds): mean ECE "
          f"{100 * report['fit']['mean_ece_before']:.2f}% -> {100 * report['fit']['mean_ece_after']:.2f}%")
    print(f"evaluated on {report['evaluated_on']}:")
    print(format_report(report))
    at_edge = [k + 1 for k, t in enumerate(temperatures) if t in (grid[0], grid[-1])]
    if at_edge:
        print(f"note: positions {at_edge} hit the end of the temperature grid [{grid[0]:g}, {grid[-1]:g}]; "
              "widen it with --grid MIN MAX POINTS (or check the drafter's confidence head)")
    print(f"wrote temperatures to {output / 'config.json'} and the report to {report_path}")
    try:
        plot_path = plot_reliability(data, temperatures, args.plot or output / PLOT_NAME, args.bins)
        print(f"wrote the reliability diagram to {plot_path}")
    except ImportError:
        if args.plot:
            raise
        print("matplotlib is not installed (pip install 'hf-dspark[plots]'); skipped the reliability diagram")
    return 0
