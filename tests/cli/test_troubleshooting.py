"""docs/troubleshooting.md cannot drift from the error classes: one section per class, and no other."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import hf_dspark
from hf_dspark import errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def all_error_classes() -> set[type]:
    """Every ``HfDSparkError`` subclass defined anywhere in the package (every module imported first)."""
    for package in (hf_dspark, importlib.import_module("hf_dspark.trainer")):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    found, todo = set(), [errors.HfDSparkError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("hf_dspark") and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def doc_sections() -> dict[str, str]:
    """``## `Name` `` heading -> the text of its section."""
    parts = re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]
    sections = {}
    for part in parts:
        heading, _, body = part.partition("\n")
        match = re.fullmatch(r"`(\w+)`", heading.strip())
        assert match, f"section heading {heading!r} is not a `ClassName`"
        sections[match.group(1)] = body
    return sections


def test_every_error_class_lives_in_errors_and_is_exported():
    for cls in all_error_classes():
        # one file defines them all (it also ships as remote code); hf_dspark.errors is their public path
        assert cls.__module__ == "hf_dspark.models.dspark.errors", f"{cls.__qualname__} is defined in {cls.__module__}"
        assert getattr(errors, cls.__name__) is cls
        assert cls.__name__ in errors.__all__ and cls.__name__ in hf_dspark.__all__, cls.__name__
        assert getattr(hf_dspark, cls.__name__) is cls
        if cls is not errors.HfDSparkError:  # each one also subclasses the builtin it stands for
            assert any(base.__module__ == "builtins" and base is not Exception for base in cls.__mro__), cls


def test_every_error_class_has_a_section_and_every_section_names_one():
    names = {cls.__name__ for cls in all_error_classes()}
    sections = doc_sections()
    assert sorted(names - set(sections)) == [], "error classes without a section in docs/troubleshooting.md"
    assert sorted(set(sections) - names) == [], "sections of docs/troubleshooting.md that name no error class"


def test_each_section_lists_the_bases_of_its_class():
    for name, body in doc_sections().items():
        cls = getattr(errors, name)
        line = next(line for line in body.splitlines() if line.strip())
        listed = re.fullmatch(r"\*Bases: (.*)\.\*", line.strip())
        assert listed, f"{name}: the section must start with '*Bases: `A`, `B`.*'"
        bases = [base.__name__ for base in cls.__mro__[1:] if base not in (BaseException, object, Exception)]
        bases = bases or ["Exception"]
        assert re.findall(r"`(\w+)`", listed.group(1)) == bases, (name, bases)
