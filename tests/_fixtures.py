"""Helpers shared by several test modules (no test module imports another one; tests/test_package.py
checks that).

Where the DeepSpec reference fixtures live, for the tests that read them; :func:`write_jsonl`; the
exact-sampling checks (``exact_joint``, ``sample_counts``, ``chi_square_rejects``) and verification
policies of the ``generate`` tests; the data folders, argv builders and subprocess helpers of the CLI
failure-path tests (``test_failure_paths``, ``test_data_safety``); the prompts, plain-``generate``
reference and made-up round costs of the batched-engine tests (used by ``test_batched``,
``test_bench_serve`` and ``test_oracle``).

The shared folder sits beside the checkout (``../shared``); ``/work/shared`` is where this project's
machines mount it when a clone lives elsewhere (e.g. CI's fresh clone); ``HF_DSPARK_FIXTURES``
overrides both. A missing folder fails the importing test module, so the reference tests cannot
vanish unnoticed; outside CI, ``HF_DSPARK_ALLOW_MISSING_SHARED=1`` turns that into a skip.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from hf_dspark.decoding.latency import LatencyProfile
from hf_dspark.decoding.round_cost import RoundCost

from _models import BOS_ID

REPO = Path(__file__).resolve().parents[1]

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
    """Write ``rows`` to ``path`` as JSON Lines (creating its folder); returns ``path``.

    A ``str`` row is written as it is (one raw line: malformed JSON for the tests of bad input),
    any other row as ``json.dumps(row)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- generate: policies and exact sampling
POLICIES = {
    "full": dict(verification_policy="full"),
    "threshold": dict(verification_policy="threshold", confidence_threshold=0.4),
    "cost": dict(verification_policy="cost", latency_table={1: 0.010, 4: 0.012, 8: 0.020}),
}


def set_policy(draft, **settings):
    for key, value in settings.items():
        setattr(draft.generation_config, key, value)
    return draft


def exact_joint(target, ids, warp):
    """Exact P(x2, x3) of plain sampling (x1 marginalised), with the target's own processors."""

    def step_probs(prefix):
        # explicit mask: a generated pad-id token must not be masked out as padding
        out = target.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=1, do_sample=True,
                              output_scores=True, return_dict_in_generate=True, **warp)
        return torch.softmax(out.scores[0][0].double(), -1)

    V = target.config.vocab_size
    joint = torch.zeros(V, V, dtype=torch.float64)
    p1 = step_probs(ids)
    for x1 in torch.nonzero(p1 > 0).flatten().tolist():
        pre1 = torch.cat([ids, torch.tensor([[x1]])], 1)
        p2 = step_probs(pre1)
        for x2 in torch.nonzero(p2 > 0).flatten().tolist():
            p3 = step_probs(torch.cat([pre1, torch.tensor([[x2]])], 1))
            joint[x2] += p1[x1] * p2[x2] * p3
    return joint


def chi_square_rejects(counts: torch.Tensor, expected_p: torch.Tensor, alpha_z: float = 3.09) -> tuple[bool, float, float]:
    n = counts.sum().item()
    exp = expected_p.flatten() * n
    obs = counts.flatten().double()
    if (obs[exp == 0] > 0).any():
        return True, math.inf, 0.0  # an impossible outcome was produced
    big = exp >= 5
    stat = (((obs[big] - exp[big]) ** 2) / exp[big]).sum().item()
    rest_e, rest_o = exp[~big & (exp > 0)].sum().item(), obs[~big & (exp > 0)].sum().item()
    df = int(big.sum().item()) - 1
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    # Wilson-Hilferty approximation of the chi-square quantile
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return stat > crit, stat, crit


def sample_counts(target, draft, ids, warp, runs, seed0=0):
    V = target.config.vocab_size
    counts = torch.zeros(V, V, dtype=torch.long)
    L = ids.shape[1]
    for s in range(runs):
        torch.manual_seed(seed0 + s)
        out = target.generate(ids, max_new_tokens=3, do_sample=True, assistant_model=draft, **warp)
        counts[out[0, L + 1], out[0, L + 2]] += 1
    return counts


# ----------------------------------------------------------------------------- CLI: data folders, argv, subprocesses
TRAIN_FLAGS = ["--num_anchors", "8", "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--threads", "1",
               "--report_to", "none", "--block_size", "4", "--markov_rank", "8", "--logging_steps", "5"]


def data_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows in the prepare-data format (random token ids; 6 prompt tokens, then the answer)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = 16 + index % 9
        ids = torch.randint(6, 128, (length,), generator=gen).tolist()
        ids[0] = BOS_ID
        rows.append({"id": f"r{seed}-{index}", "input_ids": ids, "loss_mask": [0] * 6 + [1] * (length - 6),
                     "num_prompt_tokens": 6, "num_answer_tokens": length - 6})
    return rows


def make_data(folder: Path, rows: list[dict], status: str | None = "complete") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    config = {"format_version": 1, "chat_template": False}
    if status is not None:
        config.update(status=status, num_prompts={"train": len(rows), "holdout": 0})
    (folder / "data_config.json").write_text(json.dumps(config))
    return folder


def build_cache_argv(target_dir, data_dir, output, *extra) -> list[str]:
    return ["build-cache", "--target", str(target_dir), "--data", str(data_dir), "--output", str(output),
            "--target-layer-ids", "0", "1", "--target-topk", "8", "--shard-tokens", "200", "--no-progress",
            *map(str, extra)]


def train_argv(target_dir, cache_dir, output, *extra) -> list[str]:
    return ["train", "--target", str(target_dir), "--cache", str(cache_dir), "--output", str(output), *TRAIN_FLAGS,
            *map(str, extra)]


def ctrl_c_reaches_the_child() -> None:
    """``preexec_fn`` of a child that a test interrupts: a shell runs background jobs (``pytest ... &``) with
    SIGINT ignored, children inherit that, and an ignoring hf-dspark rightly keeps ignoring it; the tests
    play a user at a terminal, whose Ctrl-C arrives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def last_line(stream: str) -> str:
    """The last line written (progress bars redraw with carriage returns)."""
    return stream.replace("\r", "\n").strip().splitlines()[-1]


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
