"""pytest fixtures shared by every test folder: folders holding the tiny target of ``_models`` (with and
without a chat template), one torch thread, a private latency cache.

Tests mirror the package (``models/``, ``decoding/``, ``checkpoints/``, ``evaluation/``, ``trainer/``,
``cli/``); the checks of the package as a whole (layering, docs, named bugs) sit at this level. Tiny
models are built in code by ``_models.py`` (no downloads); other shared helpers are in ``_fixtures.py``.
"""

from __future__ import annotations

import pytest
import torch

from _models import TINY_CHAT_TEMPLATE, save_tiny_target  # noqa: E402


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """Folder with a tiny Qwen3 target whose tokenizer has no chat template (like a base model)."""
    return save_tiny_target(tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def tiny_chat_target_dir(tmp_path_factory):
    """Folder with a tiny Qwen3 target whose tokenizer has a chat template."""
    return save_tiny_target(tmp_path_factory.mktemp("tiny_chat_target"), chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded; with two threads on a busy 2-core machine the
    thread hand-offs cost more than the arithmetic (seen: 10-100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _latency_rows_judged_plausible(request, monkeypatch):
    """Profiles measured by tests are timed on a shared machine: a load spike makes a row look implausible,
    and the profiler then measures it again and does not cache it, which changes what a test counts or finds
    for a reason that is not its own. So the judgement passes every row, except in the tests of that
    judgement (``@pytest.mark.latency_plausibility``, which script the clock)."""
    if request.node.get_closest_marker("latency_plausibility") is None:
        from hf_dspark.decoding import latency

        monkeypatch.setattr(latency, "implausible_row", lambda row, noisy=(): [])


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    """Latency profiles measured by tests stay in a folder of this run: generate's "auto" settings read the
    cache, so a profile left by another run (or by the user) must not change what a test decodes."""
    import os

    previous = os.environ.get("HF_DSPARK_CACHE")
    os.environ["HF_DSPARK_CACHE"] = str(tmp_path_factory.mktemp("hf_dspark_cache"))
    yield
    if previous is None:
        os.environ.pop("HF_DSPARK_CACHE", None)
    else:
        os.environ["HF_DSPARK_CACHE"] = previous


def pytest_report_header(config):
    """Which releases this run tests (CI runs the suite on two transformers releases)."""
    import transformers

    return f"hf-dspark tests on transformers {transformers.__version__}, torch {torch.__version__}"
