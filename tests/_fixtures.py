"""Where the DeepSpec reference fixtures live, shared by the tests that read them.

The shared folder sits beside the checkout (``../shared``); ``/work/shared`` is where this project's
machines mount it when a clone lives elsewhere (e.g. CI's fresh clone); ``HF_DSPARK_FIXTURES``
overrides both. A missing folder fails the importing test module, so the reference tests cannot
vanish unnoticed; outside CI, ``HF_DSPARK_ALLOW_MISSING_SHARED=1`` turns that into a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_CANDIDATES = [Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepspec",
               Path("/work/shared/fixtures/deepspec")]
DEFAULT_ROOT = next((c for c in _CANDIDATES if c.is_dir()), _CANDIDATES[0])
DEEPSPEC_ROOT = Path(os.environ.get("HF_DSPARK_FIXTURES", DEFAULT_ROOT))
DEEPSPEC_FIXTURES = (sorted(p for p in DEEPSPEC_ROOT.glob("*") if (p / "config.json").exists())
                     if DEEPSPEC_ROOT.is_dir() else [])


def missing_shared_may_skip(env=os.environ) -> bool:
    """Only a developer who says so (``HF_DSPARK_ALLOW_MISSING_SHARED=1``), never CI (``CI`` set)."""
    return env.get("HF_DSPARK_ALLOW_MISSING_SHARED") == "1" and not env.get("CI")


def require_deepspec_fixtures() -> None:
    """Call at import time of a test module that needs the fixtures: fail (or, when allowed, skip) without them."""
    if DEEPSPEC_FIXTURES:
        return
    message = (f"no DeepSpec fixtures under {DEEPSPEC_ROOT}: clone ../shared beside the checkout or set "
               "HF_DSPARK_FIXTURES (HF_DSPARK_ALLOW_MISSING_SHARED=1 skips these tests outside CI)")
    if missing_shared_may_skip():
        pytest.skip(message, allow_module_level=True)
    pytest.fail(message, pytrace=False)
