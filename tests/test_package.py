"""The house around the code: public entry points, absolute imports in trainer/, one error hierarchy."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------- seams between modules
# Library and trainer modules (tests may reach into private names; they are not checked).
CHECKED_FILES = sorted([*(ROOT / "hf_dspark").rglob("*.py"), *(ROOT / "trainer").glob("*.py")])


def _module_of(path: Path) -> str:
    """The dotted name a file is imported as (the top-level trainer/ folder installs as hf_dspark.trainer)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "trainer":
        parts.insert(0, "hf_dspark")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_project_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "hf_dspark":
        return False
    base = ROOT.joinpath("trainer", *parts[2:]) if parts[1:2] == ["trainer"] else ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(path: Path):
    """``(node, module, name, bound_as)`` per imported name of a file: ``name`` is None for ``import module``;
    relative imports are made absolute."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None, alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                yield node, base, alias.name, alias.asname or alias.name


def _attribute_chain(node: ast.Attribute) -> tuple[ast.expr, list[str]]:
    """``a.b.c`` -> (the expression ``a``, ["b", "c"])."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return node, names[::-1]


def test_no_library_module_imports_the_trainer():
    """hf_dspark/ is the library: the trainer (the top-level trainer/ folder, installed as hf_dspark.trainer)
    builds on it, never the reverse; what both need (reading and encoding prompts) lives in hf_dspark.data.
    cli.py names the trainer's commands as strings for its lazy dispatch, which is not an import."""
    offenders = []
    for path in (ROOT / "hf_dspark").rglob("*.py"):
        for node, module, name, _ in _imports(path):
            for imported in (module, f"{module}.{name}" if name else module):
                if imported == "hf_dspark.trainer" or imported.startswith("hf_dspark.trainer."):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {imported}")
    assert not offenders, f"move what the library needs out of the trainer (e.g. into hf_dspark.data): {offenders}"


# Private names still crossing modules; each entry is "importing file: the private name". The test fails on an
# entry that no longer occurs, so this set only shrinks.
PENDING_PRIVATE_IMPORTS: set[str] = set()


def _private_names_crossing(path: Path) -> set[str]:
    """The private names of other project modules that ``path`` imports or reaches as ``module._name``; a private
    module (``pkg._mod``) counts only when imported from outside its package ``pkg``."""
    importer = _module_of(path)
    found: set[str] = set()
    modules: dict[str, str] = {}  # local name -> the project module it is bound to

    def check_module_path(dotted: str) -> None:
        parts = dotted.split(".")
        for index, part in enumerate(parts):
            if _private(part) and not importer.startswith(".".join(parts[:index]) + "."):
                found.add(".".join(parts[: index + 1]))
                return

    for _, module, name, bound_as in _imports(path):
        if not _is_project_module(module):
            continue
        check_module_path(module)
        if name is None:
            modules[bound_as] = module if bound_as != module.split(".")[0] else bound_as
        elif _is_project_module(f"{module}.{name}"):
            check_module_path(f"{module}.{name}")
            modules[bound_as] = f"{module}.{name}"
        elif _private(name):
            found.add(f"{module}.{name}")
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute):
            root, names = _attribute_chain(node)
            if not (isinstance(root, ast.Name) and root.id in modules):
                continue
            dotted = modules[root.id]
            for attr in names:
                dotted = f"{dotted}.{attr}"
                if _is_project_module(dotted):
                    check_module_path(dotted)
                    continue
                if _private(attr):
                    found.add(dotted)
                break
    return {f"{path.relative_to(ROOT)}: {name}" for name in found}


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore is its module's own: another module that needs it gets a public name
    (or the code moves). Checked for every library and trainer module: ``from x import _name``,
    ``x._name`` on an imported project module, and private modules imported from outside their package."""
    found = set().union(*(_private_names_crossing(path) for path in CHECKED_FILES))
    new = sorted(found - PENDING_PRIVATE_IMPORTS)
    assert not new, f"make these names public (rename them where they are defined) or move the code: {new}"
    fixed = sorted(PENDING_PRIVATE_IMPORTS - found)
    assert not fixed, f"these no longer occur: remove them from PENDING_PRIVATE_IMPORTS: {fixed}"


def test_the_private_name_check_sees_every_form_of_crossing(tmp_path, monkeypatch):
    package = tmp_path / "hf_dspark" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_helpers.py").write_text("def _hidden(): pass\n")
    (package / "public.py").write_text("def _hidden(): pass\n")
    (package / "user.py").write_text(
        "from hf_dspark.pkg import _helpers, public\n"      # a private module inside its own package: fine
        "from hf_dspark.pkg.public import _hidden\n"         # a private name: found
        "from .public import _hidden as again\n"             # relative: found
        "import hf_dspark.pkg.public as other\n"
        "other._late, public._later\n"                       # attribute access on imported modules: found
        "from hf_dspark.pkg.public import __doc__\n"         # a dunder name is not private
    )
    (tmp_path / "hf_dspark" / "outside.py").write_text("from hf_dspark.pkg._helpers import x\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _private_names_crossing(package / "user.py") == {
        "hf_dspark/pkg/user.py: hf_dspark.pkg.public._hidden",
        "hf_dspark/pkg/user.py: hf_dspark.pkg.public._late",
        "hf_dspark/pkg/user.py: hf_dspark.pkg.public._later",
    }
    assert _private_names_crossing(tmp_path / "hf_dspark" / "outside.py") == {
        "hf_dspark/outside.py: hf_dspark.pkg._helpers"
    }


# transformers internals used outside the one module that hooks ``generate``; entries as above.
PENDING_PRIVATE_TRANSFORMERS: set[str] = set()


def _transformers_private_names(hook: Path) -> set[str]:
    """Private attributes of the transformers classes the project works with, less those torch objects have
    too (a tensor's ``_version`` is not a transformers name) and those the project defines itself (outside the
    ``hook`` module, whose wrappers take transformers' names)."""
    import transformers

    classes = (transformers.PreTrainedModel, transformers.GenerationMixin, transformers.PretrainedConfig,
               transformers.GenerationConfig, transformers.Trainer, transformers.TrainingArguments,
               transformers.PreTrainedTokenizerBase, transformers.HfArgumentParser, transformers.Cache,
               transformers.DynamicCache, transformers.LogitsProcessor)
    names = {name for cls in classes for name in dir(cls) if _private(name)}
    names |= {name for obj in (transformers.PretrainedConfig(), transformers.GenerationConfig()) for name in vars(obj)
              if _private(name)}
    names -= set(dir(torch.Tensor)) | set(dir(torch.nn.Module))
    own = set()
    for path in CHECKED_FILES:
        if path == hook:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                own.add(node.attr)
    return names - own


def _transformers_internals_used(path: Path, private_names: set[str]) -> set[str]:
    found: set[str] = set()
    bound: set[str] = set()  # local names of transformers modules, classes and functions
    for _, module, name, bound_as in _imports(path):
        if module.split(".")[0] != "transformers":
            continue
        bound.add(bound_as)
        if any(_private(part) for part in module.split(".")) or (name is not None and _private(name)):
            found.add(f"{module}.{name}" if name else module)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute):
            root, names = _attribute_chain(node)
            if isinstance(root, ast.Name) and root.id in bound and any(_private(n) for n in names):
                found.add(".".join([root.id, *names[: next(i for i, n in enumerate(names) if _private(n)) + 1]]))
            elif node.attr in private_names:
                found.add(f".{node.attr}")  # a transformers object's private attribute (config._attn_implementation)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in private_names):
            found.add(f".{node.args[1].value}")
    return {f"{path.relative_to(ROOT)}: {name}" for name in found}


def test_private_transformers_api_is_used_only_by_the_generate_hook():
    """transformers' private names change without notice: one module hooks ``generate`` (it wraps
    ``GenerationMixin._get_candidate_generator``, and its checks name every internal it relies on); everywhere
    else, only transformers' public API."""
    hooks = [path for path in CHECKED_FILES if any(
        isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == "_get_candidate_generator"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))))]
    assert len(hooks) == 1, f"exactly one module installs the generate hook, found {hooks}"
    private_names = _transformers_private_names(hooks[0])
    assert {"_get_candidate_generator", "_prepare_inputs", "_name_or_path"} <= private_names  # the check sees them
    assert "_version" not in private_names  # a tensor's, not transformers'
    found = set().union(*(_transformers_internals_used(path, private_names)
                          for path in CHECKED_FILES if path != hooks[0]))
    new = sorted(found - PENDING_PRIVATE_TRANSFORMERS)
    assert not new, f"use transformers' public API here, or move the code into {hooks[0].relative_to(ROOT)}: {new}"
    fixed = sorted(PENDING_PRIVATE_TRANSFORMERS - found)
    assert not fixed, f"these no longer occur: remove them from PENDING_PRIVATE_TRANSFORMERS: {fixed}"


def test_the_transformers_check_sees_every_form_of_use(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    path = tmp_path / "hf_dspark" / "user.py"
    path.parent.mkdir()
    path.write_text(
        "import transformers\n"
        "from transformers import HfArgumentParser, Trainer\n"
        "from transformers.generation.utils import _helper\n"
        "HfArgumentParser._parse_dataclass_field(group, field)\n"
        "transformers.modeling_utils._init_weights\n"
        "config._name_or_path = 'x'\n"
        "getattr(config, '_attn_implementation', None)\n"
        "weight._version, Trainer.train, config.name_or_path\n"  # not in the names given, or public
    )
    assert _transformers_internals_used(path, {"_name_or_path", "_attn_implementation"}) == {
        "hf_dspark/user.py: transformers.generation.utils._helper",
        "hf_dspark/user.py: HfArgumentParser._parse_dataclass_field",
        "hf_dspark/user.py: transformers.modeling_utils._init_weights",
        "hf_dspark/user.py: ._name_or_path",
        "hf_dspark/user.py: ._attn_implementation",
    }


def test_prompt_reading_and_encoding_moved_to_data_and_still_work_from_the_trainer():
    import warnings

    import hf_dspark.data as data
    import hf_dspark.trainer as trainer
    from hf_dspark.trainer import prompts, regenerate

    old_places = [(prompts, name) for name in ("load_prompts", "holdout_split", "expand_sources", "prompt_id",
                                                "prompt_text", "row_to_turns", "unusable_reason", "SkippedRows")]
    old_places += [(regenerate, name) for name in ("encode_prompt", "resolve_chat_mode", "has_chat_template")]
    old_places += [(trainer, "load_prompts"), (trainer, "holdout_split")]
    for module, name in old_places:
        with pytest.warns(FutureWarning, match=rf"{module.__name__}\.{name} moved to hf_dspark\.data"):
            assert getattr(module, name) is getattr(data, name)
    with pytest.warns(FutureWarning, match="import it from there"):
        from hf_dspark.trainer.prompts import load_prompts  # noqa: F401 - the old import line works
    for module in (prompts, regenerate, trainer):
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from hf_dspark.trainer.regenerate import regenerate_in_process  # noqa: F401 - what stayed warns not
    assert "load_prompts" not in trainer.__all__
