"""The house around the code: public entry points, absolute imports in trainer/, one error hierarchy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_exports_its_entry_points():
    import hf_dspark.trainer as trainer
    from hf_dspark.trainer import DSparkTrainer, DSparkTrainingArguments

    assert DSparkTrainer.__module__ == "hf_dspark.trainer.dspark_trainer"
    assert DSparkTrainingArguments.__module__ == "hf_dspark.trainer.training_args"
    for name in trainer.__all__:
        assert getattr(trainer, name) is not None, name
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018


def test_trainer_modules_import_the_package_by_absolute_name():
    relative = [f"{path.name}:{n}" for path in sorted((ROOT / "trainer").glob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1) if re.match(r"\s*from \.\.", line)]
    assert not relative, f"use `from hf_dspark.x import ...` in trainer/: {relative}"
