"""The guide stays a guide: the README's length, links that resolve, README code that names the real API,
and a results/ folder that holds only indexed files (docs/benchmarks.md is the one page of current figures)."""

from __future__ import annotations

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "results"
MAX_README_LINES = 120
MAX_RESULTS_FILES = 12
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [README, RESULTS / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "model_cards").glob("*.md"))]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("`hf-dspark eval` with the shipped `auto` lengths (2026-12-07)") == \
        "hf-dspark-eval-with-the-shipped-auto-lengths-2026-12-07"
    assert github_anchor("Tested releases") == "tested-releases"


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move figures to docs/benchmarks.md "
        "and history to docs/experiments.md")
    text = README.read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text, f"README.md must show the fresh-machine command `{command}`"
        assert (ROOT / command.split()[1]).is_file()


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"


def test_results_hold_only_indexed_files():
    files = sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*") if p.is_file())
    assert len(files) <= MAX_RESULTS_FILES, (
        f"results/ holds {len(files)} files (at most {MAX_RESULTS_FILES}, the index included): "
        "`git rm` what no current table uses and move its figures to docs/experiments.md")
    index = (RESULTS / "README.md").read_text()
    unindexed = [name for name in files if name != "README.md" and f"`{name}`" not in index]
    assert not unindexed, f"results/README.md has no row for {unindexed}"


def test_current_pages_name_only_files_that_exist():
    """README.md and docs/benchmarks.md cite current files only (history cites git commits)."""
    missing = []
    for path in (README, ROOT / "docs" / "benchmarks.md"):
        for name in re.findall(r"results/([\w.\-]+\.json)", path.read_text()):
            if "<" not in name and not (RESULTS / name).is_file():
                missing.append(f"{path.name}: results/{name}")
    assert not missing, missing


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_code_names_the_real_api():
    """Every README snippet parses, and every hf_dspark name it imports or reads as an attribute exists."""
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    checked = 0
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hf_dspark":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README imports {node.module}.{alias.name}, which does not exist"
                    checked += 1
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "hf_dspark"):
                assert hasattr(importlib.import_module("hf_dspark"), node.attr), f"README uses hf_dspark.{node.attr}"
                checked += 1
    assert checked >= 3  # load_target, resolve_draft, load_drafter, BatchedSpeculativeGenerator


MEASURED = re.compile(r"\d+(?:\.\d+)? ?(?:ms|tok/s|tokens/s)\b|\d+(?:\.\d+)? ?(?:x|×|%) (?:faster|slower|cheaper|dearer)\b",
                      re.I)


def comments_and_docstrings(path: Path):
    source = path.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def test_measured_figures_live_in_the_docs_not_in_code_comments():
    assert MEASURED.search("a pass costs 206 ms") and MEASURED.search("about 2.1x faster")
    assert not MEASURED.search("block of 7 tokens, 2 x [batch, seq]")
    found = [f"{path.relative_to(ROOT)}:{line}: {match.group(0)}"
             for folder in ("hf_dspark", "trainer", "benchmarks") for path in sorted((ROOT / folder).rglob("*.py"))
             for line, text in comments_and_docstrings(path) for match in [MEASURED.search(text)] if match]
    assert not found, f"measured figures in comments/docstrings (link docs/benchmarks.md instead): {found}"
