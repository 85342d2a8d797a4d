"""One source for the remote code: the package files are the only copy kept in the repository.

Hub exports get their remote-code files written from the package at export time
(``hf_dspark.checkpoints.export.write_remote_code``); any copy found in a shipped drafter folder must equal
the package source byte for byte.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from _models import tiny_drafter, tiny_qwen3_target

import hf_dspark
from hf_dspark.checkpoints.export import REMOTE_CODE_DIR, REMOTE_CODE_FILES, export_drafter, write_remote_code

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_ERRORS = ROOT / "hf_dspark" / "errors.py"
SKIP_DIRS = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", "runs", "work_data"}


def _copies_in_repository() -> list[Path]:
    """Every file named like a remote-code file outside the package's own sources."""
    found = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        environment = any(part.startswith(".venv") or part == "site-packages" for part in relative.parts)
        if (path.name in REMOTE_CODE_FILES and not SKIP_DIRS & set(relative.parts) and not environment
                and path.parent != REMOTE_CODE_DIR):
            if path == PUBLIC_ERRORS and "class " not in path.read_text():
                continue  # hf_dspark.errors: the public import path of the classes, it defines none
            found.append(path)
    return found


def test_remote_code_files_are_the_import_closure_of_the_modeling_and_config_files():
    from transformers.dynamic_module_utils import get_relative_import_files

    closure = {Path(p).name for name in ("modeling_dspark.py", "configuration_dspark.py")
               for p in get_relative_import_files(str(REMOTE_CODE_DIR / name))}
    assert closure | {"modeling_dspark.py", "configuration_dspark.py"} == set(REMOTE_CODE_FILES)


@pytest.mark.parametrize("name", REMOTE_CODE_FILES)
def test_remote_code_imports_only_torch_transformers_and_its_siblings(name):
    allowed = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    tree = ast.parse((REMOTE_CODE_DIR / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: must be a sibling remote-code file
                assert f"{node.module}.py" in REMOTE_CODE_FILES, (name, node.module)
                continue
            roots = [node.module.split(".")[0]]
        else:
            continue
        assert set(roots) <= allowed, (name, roots)


def test_every_shipped_copy_equals_the_package_source():
    stale = [str(p.relative_to(ROOT)) for p in _copies_in_repository()
             if p.read_bytes() != (REMOTE_CODE_DIR / p.name).read_bytes()]
    assert not stale, (f"{stale} differ from hf_dspark/; remote code has one source: delete the copies "
                       "(exports write them from the package)")


def test_the_shipped_drafter_folder_tracks_no_code_and_loads_through_the_package():
    from hf_dspark.targets import GEMMA_ALIAS, shipped_draft_dir

    folder = shipped_draft_dir(GEMMA_ALIAS)
    listed = subprocess.run(["git", "ls-files", "--", "hf_dspark/assets", "model_cards"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        tracked_code = [line for line in listed.stdout.splitlines() if line.endswith(".py")]
        assert not tracked_code, f"{tracked_code}: remote code has one source, hf_dspark/; do not commit copies"
    config = hf_dspark.DSparkConfig.from_pretrained(folder)
    assert config.model_type == "dspark" and config.auto_map["AutoModel"] == "modeling_dspark.DSparkDraftModel"


def test_hub_export_writes_the_package_files(tmp_path):
    target = tiny_qwen3_target()
    tiny_drafter(target, target_model_name="tiny-org/tiny-qwen3").save_pretrained(tmp_path / "draft")
    out = export_drafter(tmp_path / "draft", tmp_path / "hub")
    for name in REMOTE_CODE_FILES:
        assert (out / name).read_bytes() == (REMOTE_CODE_DIR / name).read_bytes(), name


def test_write_remote_code_replaces_a_stale_copy(tmp_path):
    (tmp_path / "modeling_dspark.py").write_text("# an older release\n")
    write_remote_code(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REMOTE_CODE_FILES)
    assert (tmp_path / "modeling_dspark.py").read_bytes() == (REMOTE_CODE_DIR / "modeling_dspark.py").read_bytes()
