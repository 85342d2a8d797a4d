"""Every ``hf-dspark`` flag is a field of an argument dataclass: the shared ones
(hf_dspark.commands.arguments) define --target, --dtype, --device... once; dashed flags with
underscored aliases; ``--config FILE.yaml`` for the long commands."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hf_dspark.cli import COMMANDS, command_parser, main
from hf_dspark.commands import arguments
from hf_dspark.commands.arguments import SHARED_ARGUMENTS, TargetArguments
from hf_dspark.errors import DSparkConfigError
from hf_dspark.trainer.training_args import DSparkTrainingArguments

LONG_COMMANDS = ["train", "prepare-data", "build-cache", "eval", "bench-batch", "bench-serve", "bench-oracle",
                 "calibrate", "demo", "profile"]
# The demo runs in the dtype measured fastest unless told otherwise: its --dtype defaults to auto.
OWN_DTYPE_DEFAULT = {"demo": "auto"}
SHARED_FIELDS = {f.name: cls for cls in SHARED_ARGUMENTS for f in dataclasses.fields(cls)}


def flag_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.dest not in ("help", "config")]


def field_of(parser, action):
    """(dataclass, field) the flag of ``action`` was built from."""
    cls, name = parser.argument_fields[action.dest]
    return cls, {f.name: f for f in dataclasses.fields(cls)}[name]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_is_a_dataclass_field(command):
    parser, _ = command_parser(command)
    for action in flag_actions(parser):
        assert action.dest in getattr(parser, "argument_fields", {}), (command, action.option_strings)
        cls, f = field_of(parser, action)
        assert dataclasses.is_dataclass(cls) and f.metadata.get("help"), (command, action.dest)
        if cls is DSparkTrainingArguments:
            assert command == "train"
        elif cls not in SHARED_ARGUMENTS:
            # a command's own dataclass never redefines a shared flag
            assert f.name not in SHARED_FIELDS, f"{command}: {cls.__name__}.{f.name} redefines {SHARED_FIELDS[f.name]}"
        for spelling in action.option_strings:
            if spelling.startswith("--") and "-" in spelling[2:]:
                assert "--" + spelling[2:].replace("-", "_") in action.option_strings, (command, spelling)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_target_dtype_and_device_have_one_definition(command):
    parser, _ = command_parser(command)
    shared = {f.name: f for f in dataclasses.fields(TargetArguments)}
    for action in flag_actions(parser):
        if action.dest in ("target", "dtype", "device"):
            assert parser.argument_fields[action.dest] == (TargetArguments, action.dest)
            assert action.option_strings[0] == f"--{action.dest}"
            assert action.type is shared[action.dest].metadata.get("type"), (command, action.dest)
    actions = {a.dest: a for a in flag_actions(parser)}
    if "target" in actions:  # a command needs a target, or has a default one (the demo's Gemma)
        assert actions["target"].required or actions["target"].default in (None, "gemma-3-270m"), command
    if "device" in actions:
        assert actions["device"].default == "auto" and actions["device"].type is TargetArguments.__dataclass_fields__[
            "device"].metadata["type"]
    if "dtype" in actions:
        assert actions["dtype"].default == OWN_DTYPE_DEFAULT.get(command)
        assert actions["dtype"].choices == shared["dtype"].metadata["choices"]
        assert "--target-dtype" in actions["dtype"].option_strings  # the train command's old spelling


def test_the_shared_flags_are_used_by_several_commands():
    """--target, --dtype and --device are each defined once and used by most commands."""
    users = {"target": 0, "dtype": 0, "device": 0}
    for command in COMMANDS:
        parser, _ = command_parser(command)
        for name in users:
            users[name] += parser.argument_fields.get(name) == (TargetArguments, name)
    assert users["target"] >= 10 and users["dtype"] >= 9 and users["device"] >= 7, users


def test_underscored_spellings_parse_to_the_same_values():
    parser, _ = command_parser("bench-batch")
    dashed = ["--target", "t", "--draft", "d", "--max-new-tokens", "7", "--num-prompts", "3", "--top-p", "0.5",
              "--do-sample", "--draft-dtype", "saved", "--latency-cache-dir", "c", "--concurrency", "1", "2"]
    underscored = [token.replace("-", "_") if token.startswith("--") else token for token in dashed]
    underscored = ["--" + token[2:] if token.startswith("__") else token for token in underscored]
    assert underscored != dashed
    assert vars(parser.parse_args(dashed)) == vars(parser.parse_args(underscored))
    parsed = parser.parse_args(underscored)
    assert parsed.max_new_tokens == 7 and parsed.concurrency == [1, 2] and parsed.do_sample


def test_help_lists_the_dashed_spellings_only(capsys):
    parser, _ = command_parser("eval")
    parser.print_help()
    text = capsys.readouterr().out
    assert "--max-new-tokens" in text and "--max_new_tokens" not in text


@pytest.mark.parametrize("command", LONG_COMMANDS)
def test_long_commands_take_a_config_file(command):
    parser, _ = command_parser(command)
    assert "--config" in parser._option_string_actions


def test_config_file_values_and_command_line_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("target: from-file\ndraft: [d1, d2]\nmax-new-tokens: 33\ntop_p: 0.5\nbaseline: true\n"
                      "compare_draft: [c1]\ndtype: bfloat16\n")
    parser, _ = command_parser("eval")
    args = parser.parse_args(["--config", str(config), "--max-new-tokens", "9", "--draft", "d3"])
    assert args.target == "from-file"  # required flag satisfied by the file
    assert args.max_new_tokens == 9  # the command line wins
    assert args.draft == ["d3"]  # ... also for a repeatable flag: the file's entries are dropped, not added
    assert args.top_p == 0.5 and args.baseline is True and args.compare_draft == ["c1"] and args.dtype == "bfloat16"
    args = parser.parse_args([f"--config={config}"])
    assert args.draft == ["d1", "d2"] and args.max_new_tokens == 33


def test_config_switch_written_as_its_field_value(tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text("target: t\nverify_head: false\nbatch-sizes: [1, 2]\n")
    parser, _ = command_parser("profile")
    args = parser.parse_args(["--config", str(config)])
    assert args.verify_head is False and args.batch_sizes == [1, 2]
    config.write_text("target: t\nverify_head: true\n")
    assert parser.parse_args(["--config", str(config)]).verify_head is True


def test_unknown_config_key_is_one_line_naming_the_valid_keys(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("target: t\nmax_new_token: 5\n")
    assert main(["eval", "--config", str(config), "--draft", "d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-dspark eval: error: --config")
    assert "unknown key 'max_new_token'" in err[0] and "max_new_tokens" in err[0] and "top_p" in err[0]


def test_a_plain_parser_refuses_config_instead_of_ignoring_it(tmp_path):
    from hf_dspark.commands import profile

    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    with pytest.raises(DSparkConfigError, match="does not read config files"):
        parser.parse_args(["--target", "t", "--config", str(tmp_path / "x.yaml")])


def test_every_command_is_known_to_the_test():
    assert set(LONG_COMMANDS) <= set(COMMANDS)
    assert arguments.field_flags("max_new_tokens", {}) == ["--max-new-tokens", "--max_new_tokens"]


def test_train_config_sets_training_arguments_and_the_command_line_wins(tmp_path):
    from hf_dspark.trainer import train_cli

    config = tmp_path / "train.yaml"
    config.write_text("target: t\ncache: [c1, c2]\noutput: o\nmax_steps: 50\nlearning-rate: 0.001\n"
                      "merge_lora: false\nuse_lora: true\ntarget_dtype: bfloat16\n")
    parser, _ = command_parser("train")
    args = parser.parse_args(["--config", str(config), "--max-steps", "7"])
    assert args.cache == ["c1", "c2"] and args.dtype == "bfloat16"
    training = train_cli.build_training_args(args)
    assert training.max_steps == 7 and training.learning_rate == 0.001
    assert training.use_lora is True and training.merge_lora is False
    # --data typed on the command line replaces the file's --cache (they exclude each other)
    assert parser.parse_args(["--config", str(config), "--data", "d"]).data == "d"


REFUSED_CONFIGS = [
    ("eval", "target: t\ndraft: d\ntop_p: 2\n", r"--top-p must be in \(0, 1\]"),  # the flag's own validator
    ("profile", "- target\n", "expected a mapping"),
    ("bench-batch", "target: t\ndraft: d\ndo_sample: maybe\n", "do_sample: expected true or false"),
]


@pytest.mark.parametrize("command, text, message", REFUSED_CONFIGS)
def test_bad_config_values_are_refused(tmp_path, command, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    parser, _ = command_parser(command)
    with pytest.raises(DSparkConfigError, match=message):
        parser.parse_args(["--config", str(config)])


def test_yaml_booleans_read_as_the_words_they_were(tmp_path):
    """YAML 1.1 reads a bare yes / no as a boolean: --chat-template and train's --resume still get their words."""
    config = tmp_path / "words.yaml"
    config.write_text("target: t\ndraft: d\nchat_template: no\n")
    parser, _ = command_parser("bench-batch")
    assert parser.parse_args(["--config", str(config)]).chat_template == "no"
    assert parser.parse_args(["--config", str(config), "--chat_template", "TRUE"]).chat_template == "yes"
    config.write_text("target: t\ncache: c\noutput: o\nresume: no\n")
    parser, _ = command_parser("train")
    assert parser.parse_args(["--config", str(config)]).resume == "no"


def test_short_commands_refuse_config(tmp_path):
    parser, _ = command_parser("verify")
    with pytest.raises(DSparkConfigError, match="unrecognized arguments: --config"):
        parser.parse_args([str(tmp_path), "--config", str(tmp_path / "x.yaml")])
