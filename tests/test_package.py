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
    for name in trainer.__all__:  # each name is the object of that name defined in a trainer submodule
        obj = getattr(trainer, name)
        assert obj.__name__ == name and obj.__module__.startswith("hf_dspark.trainer."), name
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018


def test_trainer_modules_import_the_package_by_absolute_name():
    relative = [f"{path.name}:{n}" for path in sorted((ROOT / "trainer").glob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1) if re.match(r"\s*from \.\.", line)]
    assert not relative, f"use `from hf_dspark.x import ...` in trainer/: {relative}"


def test_every_error_comes_from_one_hierarchy_and_keeps_its_builtin():
    import inspect

    import hf_dspark
    from hf_dspark import errors

    classes = [obj for obj in vars(errors).values() if inspect.isclass(obj) and issubclass(obj, Exception)]
    assert {cls.__name__ for cls in classes} == set(errors.__all__)
    for cls in classes:
        assert getattr(hf_dspark, cls.__name__) is cls, cls  # exported from the package too
        if cls is not errors.HfDSparkError:
            assert issubclass(cls, errors.HfDSparkError), cls
            assert issubclass(cls, (ValueError, RuntimeError)), cls
    # no error class defined anywhere else in the package
    package = ROOT / "hf_dspark"
    elsewhere = [f"{path.relative_to(ROOT)}:{line.strip()}" for path in [*package.rglob("*.py"), *(ROOT / "trainer").glob("*.py")]
                 if path.name != "errors.py" for line in path.read_text().splitlines()
                 if re.match(r"class \w+\(.*(Error|Exception)\b", line)]
    assert not elsewhere, elsewhere


def test_check_target_and_checkpoint_loading_raise_the_specific_classes(tmp_path):
    from _models import tiny_drafter, tiny_qwen3_target
    from safetensors.torch import load_file, save_file

    from hf_dspark import DSparkDraftModel
    from hf_dspark.errors import CheckpointError, DraftTargetMismatchError

    draft = tiny_drafter(tiny_qwen3_target())
    with pytest.raises(DraftTargetMismatchError, match="vocabulary: drafter expects") as caught:
        draft.check_target(tiny_qwen3_target(vocab_size=128))
    assert isinstance(caught.value, ValueError)
    draft.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("fc.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not match its config: missing tensors \['fc\.weight'\]"):
        DSparkDraftModel.from_pretrained(tmp_path)


def test_one_piecewise_linear_interpolation_serves_generate_latency_and_the_engine():
    from hf_dspark.decoding import latency, round_cost
    from hf_dspark.models.dspark.generation_dspark import interpolate, interpolate_latency

    assert latency.interpolate is interpolate and round_cost.interpolate is interpolate
    points = [(1, 1.0), (2, 3.0), (4, 4.0)]
    assert [interpolate(points, x) for x in (0, 1, 1.5, 3, 4, 6)] == [-1.0, 1.0, 2.0, 3.5, 4.0, 5.0]
    assert interpolate_latency(points, 0) == 0.0  # a latency never goes below zero
    assert interpolate([(3, 2.5)], 10) == 2.5


def test_the_engine_does_not_import_its_benchmarks():
    import ast

    from hf_dspark.decoding import batched, ragged, round_cost, scheduling, verification

    for module in (batched, ragged, round_cost, scheduling, verification):
        tree = ast.parse(Path(module.__file__).read_text())
        modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {m for m in modules if "bench" in m}, (module.__name__, modules)


def test_every_command_module_has_add_arguments_and_run():
    import importlib

    from hf_dspark.cli import COMMANDS

    for command, (module, _) in COMMANDS.items():  # as cli.run_command looks them up
        loaded = importlib.import_module(module)
        stem = command.replace("-", "_")
        add = getattr(loaded, f"add_{stem}_arguments", None) or getattr(loaded, "add_arguments", None)
        run = getattr(loaded, f"run_{stem}", None) or getattr(loaded, "run", None)
        assert callable(add) and callable(run), command


def test_no_module_passes_800_lines():
    roots = [ROOT / "hf_dspark", ROOT / "trainer"]
    long = {str(p.relative_to(ROOT)): n for root in roots for p in root.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 800}
    assert not long, f"split these modules (docs/design.md maps where code goes): {long}"


def test_library_packages_do_not_import_the_commands():
    """Commands (flags, loops, printing) sit on top: models, decoding, checkpoints and evaluation never
    import them, and the remote-code folder imports nothing of hf_dspark outside itself."""
    import ast

    for package in ("models", "decoding", "checkpoints", "evaluation"):
        for path in (ROOT / "hf_dspark" / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
            assert not {m for m in modules if m.startswith("hf_dspark.commands")}, path
            if package == "models":
                assert not {m for m in modules if m.startswith("hf_dspark")}, (path, modules)


def test_every_command_lives_in_the_commands_package_or_the_trainer():
    from hf_dspark.cli import COMMANDS

    for command, (module, _) in COMMANDS.items():
        assert module.startswith(("hf_dspark.commands.", "hf_dspark.trainer.")), (command, module)


def test_no_test_module_imports_another_test_module():
    """Shared test helpers live in tests/_fixtures.py (tiny models in tests/_models.py, pytest fixtures in
    tests/conftest.py): importing a test_* module runs its module-level code (fixture checks, skips) in the
    importer and ties the two modules together, so no module under tests/ imports one, at module level or
    inside a function. The helper modules _fixtures, _models, _sync_counter and conftest may be imported."""
    import ast

    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module] if node.module else [alias.name for alias in node.names]  # `from . import x`
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                          if name.split(".")[0].startswith("test_")]
    assert not offenders, f"move what they share into tests/_fixtures.py (or _models.py): {offenders}"
