"""The validators of ``hf-dspark`` flags, and the parser that reports a bad one in one line.

The flags themselves are dataclass fields (:mod:`hf_dspark.commands.arguments`). Each validator
here is an argparse ``type=``: argparse calls it while parsing, so a bad value is refused before a
command does any work (before a target loads, before a settings file or a folder is written). :class:`CommandParser` turns argparse's refusal into a
:class:`~hf_dspark.errors.DSparkConfigError`, which :func:`hf_dspark.cli.main` prints as one line
(``hf-dspark CMD: error: argument --top-p: ...``) with exit code 2, instead of argparse's usage
block.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from hf_dspark.errors import DSparkConfigError
from hf_dspark.targets import resolve_device


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`DSparkConfigError` instead of exiting.

    argparse prints the usage and exits itself; raising instead lets ``main`` print the same one
    line as for every other error, and lets tests and scripts catch it.
    """

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - reads --config FILE.yaml first
        from hf_dspark.commands.arguments import expand_config

        args = expand_config(self, sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        # a flag is named by its dashed spelling only: "--top-p/--top_p" -> "--top-p"
        message = re.sub(r"(--[\w-]+)(?:/-[-\w]+)+", r"\1", message)
        # "argument --top-p: must be in (0, 1]" reads as "--top-p must be in (0, 1]"
        match = re.fullmatch(r"argument ([^:]+): (must .*)", message, flags=re.S)
        if match:
            message = f"{match.group(1)} {match.group(2)}"
        raise DSparkConfigError(f"{message} (see `{self.prog} --help`)")


def _number(kind, text: str, name: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite float (``nan`` and ``inf`` are refused)."""
    return _number(float, text, "a number")


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, repeats)."""
    value = _number(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (0 usually means off)."""
    value = _number(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def ngram_tokens(text: str) -> int | str:
    """``--ngram-lookup``: an integer >= 0 (0 = off) or ``auto`` (copy lengths from the target's cost curve)."""
    if text.strip().lower() == "auto":
        return "auto"
    return non_negative_int(text)


def temperature(text: str) -> float:
    """Sampling temperature: finite and >= 0 (0 = greedy where a command allows it)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def top_p(text: str) -> float:
    """Nucleus threshold in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


def top_k(text: str) -> int:
    """Top-k: an integer >= 0 (0 = off)."""
    value = _number(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = off), got {text}")
    return value


def chat_template(text: str) -> str:
    """``--chat-template``: ``auto``, ``yes`` or ``no`` (``true`` / ``1`` and ``false`` / ``0`` read as yes / no)."""
    mode = text.strip().lower()
    if mode in ("auto", "yes", "no"):
        return mode
    if mode in ("true", "1"):
        return "yes"
    if mode in ("false", "0"):
        return "no"
    raise argparse.ArgumentTypeError(f"must be auto, yes or no, got {text!r}")


def fraction(text: str) -> float:
    """A fraction in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def device(text: str) -> str:
    """A torch device string (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) or ``auto``.

    Parsed by torch, and a CUDA device must exist: otherwise the mistake only shows when the
    target is moved there, after it has loaded.
    """
    if text == "auto":
        return text
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def resolve_target_dtype(dtype: str | None, device_arg) -> str:
    """What to pass to ``load_target``: the ``--dtype`` given, or its default for the device (``--dtype`` unset:
    bfloat16 on an accelerator, float32 on a CPU, the exact reference)."""
    if dtype is not None:
        return dtype
    return "float32" if resolve_device(device_arg).type == "cpu" else "bfloat16"


__all__ = [
    "resolve_target_dtype",
    "CommandParser", "finite_float", "positive_float", "non_negative_float", "positive_int", "non_negative_int",
    "temperature", "top_p", "top_k", "fraction", "device", "chat_template",
]
