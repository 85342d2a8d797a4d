"""Nothing lost, nothing stuck (issue 33): guarded output paths, flags checked before any work,
an engine that recovers from a bad call.

Each test reproduces one numbered item of the issue on tiny random models built in code; the
comment above it names the item.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from hf_dspark.cli import main, run_command
from hf_dspark.errors import DSparkConfigError, HfDSparkError, OutputFolderError

from conftest import BOS_ID


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prompt_rows(count: int) -> list[dict]:
    return [{"turns": [f"what is the sum of two and w{i} please"], "extra": i} for i in range(count)]


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a refused command (no traceback, the command's prefix)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-dspark {command}: error: "), err
    return err[0]


@pytest.fixture
def no_target_load(monkeypatch):
    """Fail the test if a command loads a target: its flags should have been refused first."""
    from hf_dspark import targets

    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the flags were checked")

    monkeypatch.setattr(targets, "load_target", refuse)


# ----------------------------------------------------------------------------- 1. prepare-data input in --output
@pytest.mark.parametrize("layout", ["in_output", "output_is_prompt_folder"])
def test_prepare_data_refuses_to_overwrite_its_own_prompt_file(tmp_path, tiny_target_dir, capsys, layout):
    data = tmp_path / "data"
    prompts = write_jsonl(data / "prompts.jsonl", prompt_rows(6))
    before = prompts.read_bytes()
    source = prompts if layout == "in_output" else data
    argv = ["prepare-data", "--target", str(tiny_target_dir), "--prompts", str(source), "--output", str(data),
            "--max-new-tokens", "3", "--greedy", "--num-prompts", "2", "--holdout", "0", "--no-progress"]
    assert main(argv) == 2
    assert "--prompts" in one_error_line(capsys, "prepare-data")
    assert prompts.read_bytes() == before


def test_prepare_data_refuses_a_folder_it_did_not_write(tmp_path, tiny_target_dir, capsys):
    prompts = write_jsonl(tmp_path / "in" / "p.jsonl", prompt_rows(3))
    theirs = tmp_path / "theirs"
    write_jsonl(theirs / "train.jsonl", [{"mine": True}])
    argv = ["prepare-data", "--target", str(tiny_target_dir), "--prompts", str(prompts), "--output", str(theirs),
            "--max-new-tokens", "3", "--greedy", "--num-prompts", "2", "--holdout", "0", "--no-progress"]
    assert main(argv) == 2
    assert "not empty" in one_error_line(capsys, "prepare-data")
    assert json.loads((theirs / "train.jsonl").read_text()) == {"mine": True}
    # its own earlier output (marker written on the first run) is resumed
    out = tmp_path / "out"
    argv[argv.index(str(theirs))] = str(out)
    assert main(argv) == 0 and main(argv) == 0
