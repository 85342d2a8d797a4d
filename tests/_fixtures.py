"""Helpers shared by several test modules (no test module imports another one).

Where the DeepSpec reference fixtures live, for the tests that read them; :func:`write_jsonl`; the prompts,
plain-``generate`` reference and made-up round costs of the batched-engine tests (used by
``test_batched``, ``test_bench_serve`` and ``test_oracle``).

The shared folder sits beside the checkout (``../shared``); ``/work/shared`` is where this project's
machines mount it when a clone lives elsewhere (e.g. CI's fresh clone); ``HF_DSPARK_FIXTURES``
overrides both. A missing folder fails the importing test module, so the reference tests cannot
vanish unnoticed; outside CI, ``HF_DSPARK_ALLOW_MISSING_SHARED=1`` turns that into a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hf_dspark.decoding.latency import LatencyProfile
from hf_dspark.decoding.round_cost import RoundCost

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


def write_jsonl(path: Path, rows) -> Path:
    """Write ``rows`` to ``path`` as JSON Lines; returns ``path``."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- batched-engine helpers
def train_prompts(seed=5, n=3, length=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (1, length), generator=gen) for _ in range(n)]


def mixed_prompts(target, train) -> list[list[int]]:
    """Different lengths: training prompts (long acceptances), their prefixes, a prompt extended
    by its own continuation, a one-token prompt, and random prompts longer than Gemma's window."""
    gen = torch.Generator().manual_seed(9)
    first = train[0][0].tolist()
    extended = target.generate(train[1], max_new_tokens=5, do_sample=False)[0].tolist()
    return [
        first, train[1][0].tolist(), first[:4], extended, [first[0]], train[2][0].tolist()[:6],
        torch.randint(3, 90, (12,), generator=gen).tolist(), torch.randint(3, 90, (3,), generator=gen).tolist(),
    ]


def plain(target, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    kwargs = {} if eos is None else {"eos_token_id": eos}
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def synthetic_profile(max_batch=64, per_token=0.06):
    """A made-up latency curve: a pass costs more with more rows and tokens (no timing in tests)."""
    table = {b: {n: 0.004 * (1 + 0.05 * b) * (1 + per_token * n) for n in range(1, 9)} for b in (1, 4, 16, max_batch)}
    return LatencyProfile(model_name="synthetic", dtype="float32", device="cpu", num_threads=1, context_length=128,
                          table=table)


def synthetic_cost(max_batch=64, per_token=0.3, draft_seconds=0.002, per_row=0.0):
    """A made-up round-time model: the curve above (steeper by default) and a drafter costing
    ``draft_seconds + per_row`` per row; nothing is timed, so schedules are deterministic."""
    return RoundCost(synthetic_profile(max_batch, per_token),
                     draft_seconds={1: draft_seconds + per_row, 2: draft_seconds + 2 * per_row})


def repetitive_prompts(seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in (4, 3, 5):
        motif = torch.randint(3, 90, (length,), generator=gen).tolist()
        out.append(motif + torch.randint(3, 90, (2,), generator=gen).tolist() + motif + motif[:2])
    return out
