"""The flags of every ``hf-dspark`` command, as dataclass fields.

The flags several commands share are defined once here, grouped as in TRL's and transformers' CLIs:
:class:`TargetArguments` (``--target``, ``--dtype``, ``--device``...), :class:`DrafterArguments`,
:class:`PromptArguments`, :class:`SamplingArguments`, :class:`RuntimeArguments` and
:class:`OutputArguments`. A command adds the fields it uses with :func:`add_dataclass_arguments`;
flags only one command has are fields of a small dataclass in that command's module, added the
same way. Each field carries its help and its argparse settings (validator, choices, nargs...) in
``metadata``; its flag is the field name with dashes (``--max-new-tokens``), and the underscored
spelling (``--max_new_tokens``) is accepted too, hidden from ``--help``.

:func:`add_config_argument` gives a long command ``--config FILE.yaml``: the file's keys are the
field names (dashes or underscores), a flag given on the command line wins over the file, and an
unknown key is a one-line error naming the valid ones. :class:`~hf_dspark.commands._args.CommandParser`
reads the file (:func:`expand_config`) before argparse sees the command line, so the file's values
go through the same validators as typed flags.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hf_dspark.commands import _args
from hf_dspark.commands._args import (  # re-exported: the validators and the parser, for commands outside this package
    CommandParser, chat_template, device, finite_float, fraction, ngram_tokens, non_negative_float, non_negative_int,
    positive_float, positive_int, resolve_target_dtype, temperature, top_k, top_p,
)
from hf_dspark.errors import DSparkConfigError
from hf_dspark.targets import TARGET_DTYPES

# argparse settings a field's metadata may carry (besides "help"); "flags" replaces the dashed spelling
# (e.g. convert's --from), "aliases" adds spellings.
_ARGPARSE_KEYS = ("type", "choices", "nargs", "metavar", "action", "required", "const")


def flag(default: Any = None, help: str = "", **settings) -> Any:
    """A dataclass field that is a command-line flag: ``default`` (a list default is copied per
    instance), ``help`` and the argparse ``settings`` (type, choices, nargs, metavar, action, flags,
    aliases, positional)."""
    metadata = {"help": help, **settings}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- the shared groups
@dataclass
class TargetArguments:
    """The target model and where it runs."""

    target: str | None = flag(help="target model: Hub id, local folder or 'gemma-3-270m'")
    target_config: str | None = flag(
        help="build a target with random weights from this JSON config file, or a shipped one: qwen3-4b, qwen3-8b")
    target_name: str | None = flag(
        metavar="HUB_ID", help="the target's Hub id (model card base_model), for drafters and checkpoints that do "
                               "not record it (DeepSpec's), e.g. Qwen/Qwen3-4B")
    dtype: str | None = flag(
        choices=("auto", *TARGET_DTYPES), aliases=("--target-dtype", "--target_dtype"),
        help="target dtype (default: bfloat16 on an accelerator, float32 on a CPU; 'auto': also on a CPU the "
             "faster dtype, measured once and cached)")
    device: str = flag(
        "auto", type=_args.device,
        help="where the target runs: 'auto' (default: cuda if available, else cpu), 'cpu', 'cuda:0', ...")


@dataclass
class DrafterArguments:
    """The drafter under test and how it drafts."""

    draft: str | None = flag(help="drafter folder (save_pretrained output) or Hub id")
    draft_dtype: str = flag("auto", choices=("auto", "saved", *TARGET_DTYPES),
                            help="drafter dtype: auto = the target's dtype (default), saved = as stored")
    policy: str | None = flag(
        choices=("full", "threshold", "cost", "auto"),
        help="verification policy (default: the drafter's saved one; 'cost' without a saved latency table "
             "profiles the target first; 'auto' profiles it once per machine, cached)")
    ngram_lookup: int | str | None = flag(
        type=_args.ngram_tokens, metavar="N|auto",
        help="n-gram rounds: copy up to N tokens after an earlier match of the last tokens instead of drafting "
             "(0 = off; auto: lengths from the target's cost curve; default: the drafter's saved setting)")


@dataclass
class PromptArguments:
    """Which prompts, and how they are rendered and cut."""

    prompts: list[str] | None = flag(
        nargs="+", metavar="FILE", help="prompt files (.jsonl/.json/.parquet of {'turns': [...]} rows), folders of "
                                        "them, or Hub dataset ids")
    num_prompts: int | None = flag(type=_args.positive_int, help="prompts to use")
    max_prompts: int | None = flag(type=_args.positive_int, help="use the first N prompts of each set")
    split: str | None = flag(help="split of Hub datasets (default train)")
    column: str | None = flag(help="field holding the prompt text")
    strict: bool = flag(False, action="store_true",
                        help="stop at the first prompt row without a usable prompt (default: skip and count them)")
    chat_template: str = flag(
        "auto", type=_args.chat_template, metavar="auto|yes|no",
        help="wrap prompts in the target's chat template: auto (default: as the drafter's training prompts were, "
             "else when the tokenizer has a template), yes or no")
    max_prompt_tokens: int | None = flag(type=_args.positive_int, help="prompt token limit")
    max_new_tokens: int = flag(128, type=_args.positive_int, help="new tokens per prompt (default 128)")


@dataclass
class SamplingArguments:
    """How tokens are drawn."""

    do_sample: bool = flag(False, action="store_true", help="sample instead of greedy decoding")
    temperature: float | None = flag(type=_args.temperature, help="sampling temperature (0 = greedy)")
    top_k: int | None = flag(type=_args.top_k, help="sampling top-k (0 or unset = off)")
    top_p: float | None = flag(type=_args.top_p, help="sampling top-p (1 or unset = off)")
    seed: int = flag(0, type=int, help="random seed of prompt shuffles and sampling (default 0)")


@dataclass
class RuntimeArguments:
    """The machine: threads, latency profiles, progress bars."""

    threads: int | None = flag(type=_args.positive_int, help="torch CPU threads (default: torch's choice)")
    latency_profile: str | None = flag(help="a latency profile JSON (default: measure, cached)")
    latency_cache_dir: str | None = flag(help="latency profile cache folder (default ~/.cache/hf_dspark/latency)")
    profile_repeats: int = flag(5, type=_args.positive_int, help="timed passes per latency point (default 5)")
    no_progress: bool = flag(False, action="store_true", help="hide the progress bars")


@dataclass
class OutputArguments:
    """Where results go."""

    output: str | None = flag(help="write the results to this file or folder")
    overwrite: bool = flag(False, action="store_true", help="replace an existing --output instead of resuming it")
    plot: str | None = flag(help="draw the results to this PNG")


SHARED_ARGUMENTS = (TargetArguments, DrafterArguments, PromptArguments, SamplingArguments, RuntimeArguments,
                    OutputArguments)


# ----------------------------------------------------------------------------- dataclass -> argparse
_HIDDEN_ALIASES: set[str] = set()  # old spellings kept working (metadata "aliases"), not shown by --help


class DashedHelpFormatter(argparse.HelpFormatter):
    """``--help`` lists each flag's dashed spelling only (the underscored alias still parses)."""

    def _format_action_invocation(self, action):  # argparse's hook
        shown = [s for s in action.option_strings
                 if s == action.option_strings[0]
                 or not (is_underscore_alias(s, action.option_strings) or s in _HIDDEN_ALIASES)]
        if len(shown) != len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def is_underscore_alias(spelling: str, spellings: Sequence[str]) -> bool:
    """Whether ``spelling`` is the underscored twin of another of ``spellings`` (``--max_new_tokens``)."""
    return "_" in spelling and spelling.replace("_", "-") in spellings and spelling.replace("_", "-") != spelling


def field_flags(name: str, metadata) -> list[str]:
    """The option strings of field ``name``: the dashed flag first, then its underscored twin and aliases."""
    flags = list(metadata.get("flags") or [f"--{name.replace('_', '-')}"])
    if "flags" not in metadata and "_" in name:
        flags.append(f"--{name}")
    flags += [alias for alias in metadata.get("aliases", ()) if alias not in flags]
    _HIDDEN_ALIASES.update(metadata.get("aliases", ()))
    return flags


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    required: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    exclusive: Sequence[str] = (),
    exclusive_required: bool = False,
    title: str | None = None,
):
    """Add the fields ``names`` of dataclass ``cls`` (all by default) to ``parser`` as one argument group.

    ``required``: fields this command cannot run without. ``defaults`` / ``overrides``: a command's own
    default or argparse settings (help, type...) for a shared field, where its meaning differs there.
    ``exclusive``: fields of which at most one may be given (exactly one with ``exclusive_required``).
    Records which dataclass field each flag comes from in ``parser.argument_fields`` (dest -> (cls, name)).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields) if names is None else list(names)
    unknown = [name for name in [*names, *required, *(defaults or {}), *(overrides or {}), *exclusive]
               if name not in fields]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    required, defaults, overrides = set(required), dict(defaults or {}), dict(overrides or {})
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = DashedHelpFormatter
    if exclusive:
        parser.__dict__.setdefault("exclusive_fields", []).append(tuple(exclusive))
    group = parser.add_argument_group(title or (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip("."))
    together = group.add_mutually_exclusive_group(required=exclusive_required) if exclusive else None
    for name in names:
        f = fields[name]
        settings = {**f.metadata, **overrides.get(name, {})}
        kwargs = {key: settings[key] for key in _ARGPARSE_KEYS if key in settings}
        kwargs["help"] = settings.get("help", "")
        kwargs["default"] = defaults[name] if name in defaults else _field_default(f)
        if settings.get("action") in ("store_true", "store_false"):
            kwargs.pop("type", None)
        if settings.get("positional"):
            kwargs.pop("required", None)
            action = group.add_argument(name, **kwargs)
        else:
            if name in required:
                kwargs["required"] = True
            container = together if name in exclusive else group
            action = container.add_argument(*field_flags(name, settings), dest=name, **kwargs)
        record_arguments(parser, cls, [action])
    return group


def record_arguments(parser: argparse.ArgumentParser, cls: type, actions: Iterable[argparse.Action]) -> None:
    """Note on ``parser`` that ``actions`` are the flags of fields of dataclass ``cls`` (of the same names):
    ``parser.argument_fields`` maps each dest to ``(cls, field name)``, ``parser.argument_actions`` lists them
    (what ``--config`` may set)."""
    fields = parser.__dict__.setdefault("argument_fields", {})
    listed = parser.__dict__.setdefault("argument_actions", [])
    for action in actions:
        fields[action.dest] = (cls, action.dest)
        listed.append(action)


# ----------------------------------------------------------------------------- --config FILE.yaml
class _ConfigAction(argparse.Action):
    """``--config``, reached only by a parser that did not read the file first (a plain ArgumentParser)."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise DSparkConfigError(f"--config {values}: this parser does not read config files; run the command "
                                "through `hf-dspark` (hf_dspark.cli)")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml``: flags read from a YAML mapping (keys: field names); the command line wins."""
    parser.reads_config = True
    parser.add_argument("--config", action=_ConfigAction, metavar="FILE.yaml", default=None,
                        help="read flags from this YAML file: keys are the flag names (dashes or underscores), "
                             "values as on the command line (lists for several values, true/false for switches); "
                             "flags given on the command line override the file")


def _config_paths(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config files in ``argv``, ``argv`` without them)."""
    paths, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest += argv[i:]
            break
        if token == "--config":
            if i + 1 >= len(argv):
                raise DSparkConfigError("--config needs a file: --config FILE.yaml")
            paths.append(argv[i + 1])
            i += 2
            continue
        if token.startswith("--config="):
            paths.append(token.split("=", 1)[1])
        else:
            rest.append(token)
        i += 1
    return paths, rest


def read_config(path: str) -> dict:
    """The mapping in YAML file ``path``; a one-line error if it is missing or not a mapping."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as error:
        raise DSparkConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from error
    except yaml.YAMLError as error:
        raise DSparkConfigError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DSparkConfigError(f"--config {path}: expected a mapping of flag names to values, got a "
                                f"{type(data).__name__}")
    return data


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0 and isinstance(action.const, bool)


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _config_tokens(action: argparse.Action, value, by_dest: bool, where: str) -> list[str]:
    flag_ = action.option_strings[0]
    if _is_switch(action):
        if not isinstance(value, bool):
            raise DSparkConfigError(f"{where}: expected true or false, got {value!r}")
        wanted = action.const if by_dest else True  # `verify_head: false` and `no_verify_head: true` agree
        return [flag_] if value == wanted else []
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):  # a repeatable flag: one flag per value
        return [token for item in values for token in (flag_, _text(item))]
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        return [flag_, *map(_text, values)]
    return [flag_, _text(value)]


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config FILE`` replaced by the flags of that file not given in ``argv``.

    The file's flags come first, so the command line also wins for flags argparse lets repeat.
    """
    argv = list(argv)
    if not getattr(parser, "reads_config", False):  # a short command: argparse refuses the flag
        return argv
    paths, rest = _config_paths(argv)
    if not paths:
        return argv
    actions = [a for a in getattr(parser, "argument_actions", ()) if a.option_strings]
    by_dest, by_flag = {}, {}
    for action in actions:
        by_dest.setdefault(action.dest, action)
        for spelling in action.option_strings:
            by_flag.setdefault(spelling.lstrip("-").replace("-", "_"), action)
    given = {action.dest for action in actions for token in rest for spelling in action.option_strings
             if token == spelling or token.startswith(spelling + "=")}
    for group in getattr(parser, "exclusive_fields", ()):  # `--rates` typed replaces the file's `load`
        if given & set(group):
            given |= set(group)
    tokens = []
    for path in paths:
        for key, value in read_config(path).items():
            name = str(key).replace("-", "_")
            action = by_dest.get(name) or by_flag.get(name)
            if action is None:
                raise DSparkConfigError(
                    f"--config {path}: unknown key {key!r}; valid keys: {', '.join(sorted(by_dest))}")
            if action.dest in given or value is None:
                continue
            tokens += _config_tokens(action, value, name in by_dest, f"--config {path}: {key}")
    return tokens + rest


__all__ = [
    "flag", "TargetArguments", "DrafterArguments", "PromptArguments", "SamplingArguments", "RuntimeArguments",
    "OutputArguments", "SHARED_ARGUMENTS", "add_dataclass_arguments", "add_config_argument", "expand_config",
    "read_config", "field_flags", "is_underscore_alias", "DashedHelpFormatter", "record_arguments",
    # the validators (hf_dspark.commands._args)
    "CommandParser", "resolve_target_dtype", "finite_float", "positive_float", "non_negative_float", "positive_int",
    "non_negative_int", "ngram_tokens", "temperature", "top_p", "top_k", "fraction", "device", "chat_template",
]
