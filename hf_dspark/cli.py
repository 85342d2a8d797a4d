"""`hf-dspark` command line.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together, importing the module of
the command actually used (so ``hf-dspark --help`` stays fast). Every flag is a field of an
argument dataclass (:mod:`hf_dspark.commands.arguments`: ``--target``, ``--dtype``, ``--device`` and
the other shared flags are defined there once), spelled with dashes (the underscored spelling also
parses); the long commands take ``--config FILE.yaml`` with the same names as keys.

:func:`main` is the one place that turns failures into exit codes: errors a user causes and
can fix (the :mod:`hf_dspark.errors` classes, missing or unreadable files, corrupt JSON or
safetensors) print ``hf-dspark COMMAND: error: <message>`` and exit 2; Ctrl-C prints one line
saying how to resume and exits 130; anything else is a bug and keeps its traceback.
:func:`run_command` runs a command without that handling (errors propagate), for tests and
scripts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("hf_dspark.trainer.prepare_data", "Load prompts and regenerate answers with the target."),
    "build-cache": ("hf_dspark.trainer.feature_cache", "Run the target once per sequence and cache its features."),
    "train": ("hf_dspark.trainer.train_cli", "Train a DSpark drafter (cached or online features, optional LoRA)."),
    "calibrate": ("hf_dspark.commands.calibrate", "Fit Sequential Temperature Scaling of the confidence head."),
    "profile": ("hf_dspark.commands.profile", "Measure the target's forward latency vs tokens per pass."),
    "eval": ("hf_dspark.commands.eval", "Measure acceptance length and speed-up on prompt files."),
    "merge-eval": ("hf_dspark.commands.eval", "Pool `hf-dspark eval` files measured on disjoint prompts (shards)."),
    "bench-batch": ("hf_dspark.commands.bench_batch", "Benchmark the batched speculative engine vs plain batched generate."),
    "bench-serve": ("hf_dspark.commands.bench_serve", "Benchmark the batched engine under Poisson arrivals (TPOT vs throughput)."),
    "bench-oracle": ("hf_dspark.commands.bench_oracle", "Speed-up at an imposed acceptance (oracle proposals) vs the ideal: system cost alone."),
    "export": ("hf_dspark.commands.export", "Export a drafter as a Hub repo, or for DeepSpec / vLLM / SGLang / speculators."),
    "convert": ("hf_dspark.commands.convert", "Convert a DeepSpec or speculators DSpark checkpoint to the Hub layout."),
    "push": ("hf_dspark.commands.export", "Upload an exported drafter folder to the Hub."),
    "verify": ("hf_dspark.commands.verify", "Check a drafter folder's weights against the sha256 its export recorded."),
    "demo": ("hf_dspark.commands.demo", "Run the Gemma 3 270M demo with the shipped drafter."),
}

# What an interrupted command keeps, for the one line printed on Ctrl-C (commands not listed keep nothing).
RESUMABLE: dict[str, str] = {
    "prepare-data": "answers already written are kept",
    "build-cache": "finished shards are kept",
    "train": "training continues from the latest complete checkpoint",
    "eval": "with --output, prompts already measured are kept",
    "calibrate": "with --rounds, prompts already recorded are kept",
}
# Commands that resume only when a flag asks for it: the interrupt line names the flag.
RESUMABLE_WITH_FLAG: dict[str, tuple[str, str]] = {
    "bench-batch": ("--resume", "with --output, the concurrencies already measured are kept"),
    "bench-serve": ("--resume", "with --output, the runs already measured are kept"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dspark", description="DSpark speculative decoding toolchain.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors a user causes and can fix: reported in one line, without a traceback."""
    from safetensors import SafetensorError

    from hf_dspark.errors import HfDSparkError

    # OSError: missing, unreadable or unwritable files and unreachable Hub repositories;
    # JSONDecodeError / UnicodeDecodeError / SafetensorError: a corrupt file read directly.
    return (HfDSparkError, OSError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError)


def error_message(error: BaseException) -> str:
    """``error`` as one line; errors that are not ours are prefixed with their type."""
    from hf_dspark.errors import HfDSparkError

    message = " ".join(str(error).split()) or type(error).__name__
    return message if isinstance(error, HfDSparkError) else f"{type(error).__name__}: {message}"


def command_parser(name: str):
    """The parser of command ``name`` and its ``run`` function.

    Its flags are fields of the argument dataclasses (:mod:`hf_dspark.commands.arguments`); a bad flag
    raises DSparkConfigError (one line, exit 2 in main) instead of argparse's usage block.
    """
    from hf_dspark.commands.arguments import CommandParser

    module = importlib.import_module(COMMANDS[name][0])
    parser = CommandParser(prog=f"hf-dspark {name}", description=COMMANDS[name][1])
    add_arguments = getattr(module, f"add_{name.replace('-', '_')}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
    add_arguments(parser)
    return parser, run


def run_command(argv: list[str]) -> int:
    """Parse ``argv`` (``[COMMAND, *flags]``) and run that command; its errors propagate."""
    parser, run = command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    return int(run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    try:
        return run_command(argv)
    except KeyboardInterrupt:
        if name in RESUMABLE_WITH_FLAG:
            flag, kept = RESUMABLE_WITH_FLAG[name]
            print(f"hf-dspark {name}: interrupted; rerun the same command with {flag} to resume ({kept}).",
                  file=sys.stderr, flush=True)
        elif name in RESUMABLE:
            print(f"hf-dspark {name}: interrupted; rerun the same command to resume ({RESUMABLE[name]}).",
                  file=sys.stderr, flush=True)
        else:
            print(f"hf-dspark {name}: interrupted.", file=sys.stderr, flush=True)
        return 130
    except expected_errors() as error:
        print(f"hf-dspark {name}: error: {error_message(error)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
