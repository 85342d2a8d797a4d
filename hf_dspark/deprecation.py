"""Names that moved keep working from their old place for one release, with a ``FutureWarning``."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

__all__ = ["moved_names"]


def moved_names(old_module: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module``: each name of ``new_homes`` (name -> the module it lives in
    now) is still found there, with a ``FutureWarning`` that says where to import it from; any other name
    raises ``AttributeError`` as usual. Assign the result to ``__getattr__`` in the old module."""

    def __getattr__(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(
            f"{old_module}.{name} moved to {new_homes[name]}.{name}: import it from there (the old place goes "
            "away in the next release).",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new_homes[name]), name)

    return __getattr__
