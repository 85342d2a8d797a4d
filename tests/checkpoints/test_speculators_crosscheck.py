"""Our ``--format speculators`` export checked with speculators' OWN code (speculators 0.9.0).

speculators 0.9.0 pins transformers<=5.19, so it cannot share this environment (transformers
5.24). The test builds a separate virtual environment once and caches it under
``~/.cache/hf-dspark/speculators-venv-<key>`` (or ``$HF_DSPARK_SPECULATORS_VENV``): the same CPU
``torch==2.13.0`` as ours (the way scripts/test.sh installs it, then pinned by a constraints file
so no other torch can come in), transformers 5.19.0, ``speculators==0.9.0 --no-deps``, and only
what importing ``speculators.models.dspark`` needs (the package's ``__init__`` imports its
training data code: loguru, datasets, openai, hs-connectors). Building it takes about a minute
from PyPI, hence ``slow``.

Checked in that environment (tests/speculators_worker.py):
* ``DSparkSpeculatorConfig.from_pretrained`` parses our config.json (layer ids, block layout, heads);
* speculators' ``DSparkDraftModel`` takes our state dict with no missing keys (beyond the ones it
  fills from the verifier itself: embed_tokens, lm_head, verifier_lm_head, verifier_norm) and no
  unexpected keys, and ``from_pretrained`` loads the folder, weights unchanged and nothing NaN;
* one forward of their model on fixed inputs (their own attention implementation,
  simple_flex_attention, which runs on CPU), anchors given: the Markov-corrected block logits and
  the confidence logits equal ours within 1e-5 (float32, the same operations in a different
  order; 1e-5 is also the fixtures' tolerance; measured <= 2.7e-7 on the tiny drafters, 1.2e-6 on
  the fixture), for vanilla, gated and rnn heads, a reduced vocabulary, and DeepSpec's qwen3_rnn
  fixture (where both must also equal DeepSpec's own training reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import target_features, tiny_drafter, tiny_qwen3_target
from safetensors.torch import load_file, save_file
from _fixtures import DEEPSPEC_ROOT as ROOT, require_deepspec_fixtures

from hf_dspark.checkpoints.export import export_drafter

pytestmark = pytest.mark.slow

ATOL = 1e-5
TORCH = "torch==2.13.0"  # the CPU wheel, as scripts/test.sh installs it
REQUIREMENTS = ("transformers==5.19.0", "loguru>=0.7.2,<=0.7.3", "datasets>=4.0,<=5.1.0", "openai",
                "hs-connectors==0.9.0", "pydantic>=2")
SPECULATORS = "speculators==0.9.0"
WORKER = Path(__file__).resolve().parents[1] / "speculators_worker.py"


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def speculators_python() -> Path:
    """The python of the cached speculators environment, built when missing."""
    key = hashlib.sha256(repr((sys.version_info[:2], TORCH, REQUIREMENTS, SPECULATORS)).encode()).hexdigest()[:12]
    default = Path.home() / ".cache" / "hf-dspark" / f"speculators-venv-{key}"
    venv = Path(os.environ.get("HF_DSPARK_SPECULATORS_VENV", default))
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    building = venv.with_name(venv.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    new_python = building / "bin" / "python"
    _pip(new_python, TORCH)
    constraints = building / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")  # nothing installed later may replace torch
    _pip(new_python, "-c", str(constraints), *REQUIREMENTS)
    _pip(new_python, "--no-deps", SPECULATORS)
    check = subprocess.run([str(new_python), "-c", "import speculators.models.dspark, torch; print(torch.__version__)"],
                           capture_output=True, text=True)
    if check.returncode or not check.stdout.startswith("2.13.0"):
        raise RuntimeError(f"the speculators environment does not import: {check.stdout}{check.stderr[-3000:]}")
    # venv scripts hard-code their folder; python itself is resolved through pyvenv.cfg, so a
    # renamed environment keeps working for `python -m ...` / `python script.py`
    building.rename(venv)
    return python


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
    """Exports of several drafters, their fixed inputs and our outputs; then ONE run of the worker
    in the speculators environment over all of them. Returns {case: (ours, theirs, report)}."""
    python = speculators_python()
    root = tmp_path_factory.mktemp("speculators")
    target = tiny_qwen3_target()
    target.save_pretrained(root / "target")
    cases = {}
    vocab_ids = [0, 1, 2] + list(range(10, 90, 2))
    for name, overrides in {
        "vanilla": {},
        "gated": dict(markov_head_type="gated"),
        "rnn": dict(markov_head_type="rnn", target_layer_ids=[1, 3]),
        "reduced_vocab": dict(draft_vocab_size=len(vocab_ids), draft_token_ids=vocab_ids),
    }.items():
        draft = tiny_drafter(target, context_input_norm=False, target_model_name=str(root / "target"), **overrides)
        draft.save_pretrained(root / name / "draft")
        export_drafter(root / name / "draft", root / name / "spec", format="speculators", target=root / "target")
        ids = torch.randint(3, 90, (1, 32), generator=torch.Generator().manual_seed(len(cases)))
        feats = target_features(target, ids, draft.config.target_layer_ids)
        with torch.no_grad():
            last = target(ids, output_hidden_states=True).hidden_states[-1]
            anchors = torch.tensor([[2, 8, 15, 21, 26]])
            out = draft(ids, feats, anchor_positions=anchors)
        inputs = {"input_ids": ids, "hidden_states": feats, "last": last, "anchors": anchors}
        cases[name] = (root / name, inputs, {"draft_logits": out.draft_logits[0], "confidence": out.confidence_logits[0]})
    cases["deepspec_qwen3_rnn"] = _deepspec_case(root)
    manifest = []
    for name, (folder, inputs, _) in cases.items():
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(folder / "inputs.safetensors"))
        manifest.append({"checkpoint": str(folder / "spec"), "inputs": str(folder / "inputs.safetensors"),
                         "output": str(folder / "theirs.safetensors"), "report": str(folder / "report.json"),
                         "attn": "default"})
    (root / "cases.json").write_text(json.dumps(manifest))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(python), str(WORKER), str(root / "cases.json")], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: (ours, load_file(folder / "theirs.safetensors"), json.loads((folder / "report.json").read_text()))
            for name, (folder, _, ours) in cases.items()}


def _deepspec_case(root: Path):
    """DeepSpec's qwen3_rnn fixture exported for speculators, with a verifier whose embedding table and
    LM head are the fixture's frozen copies (speculators reloads them from the verifier)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_dspark import load_drafter

    require_deepspec_fixtures()
    fixture = ROOT / "qwen3_rnn"
    tables = load_file(fixture / "model.safetensors")
    target_config = json.loads((ROOT / "target_config.json").read_text())
    target_config["tie_word_embeddings"] = False
    verifier = Qwen3ForCausalLM(Qwen3Config(**target_config))
    with torch.no_grad():
        verifier.model.embed_tokens.weight.copy_(tables["embed_tokens.weight"])
        verifier.lm_head.weight.copy_(tables["lm_head.weight"])
    verifier.save_pretrained(root / "deepspec" / "verifier")
    export_drafter(fixture, root / "deepspec" / "spec", format="speculators",
                   target_model_name=str(root / "deepspec" / "verifier"))
    ref = load_file(fixture / "train_reference.safetensors")
    assert bool(ref["block_keep_mask"][0].all())  # row 0: 8 real blocks
    inputs = {"input_ids": ref["input_ids"][:1], "hidden_states": ref["target_hidden_states"][:1],
              "last": ref["target_last_hidden_states"][:1], "anchors": ref["anchor_positions"][:1]}
    draft = load_drafter(fixture)
    with torch.no_grad():
        out = draft(inputs["input_ids"], inputs["hidden_states"], anchor_positions=inputs["anchors"])
    # our outputs for this row, which themselves equal DeepSpec's reference (checked below too)
    ours = {"draft_logits": out.draft_logits[0], "confidence": out.confidence_logits[0],
            "deepspec_draft_logits": ref["draft_logits"][0], "deepspec_confidence": ref["confidence_pred"][0]}
    return root / "deepspec", inputs, ours


CASES = ["vanilla", "gated", "rnn", "reduced_vocab", "deepspec_qwen3_rnn"]


@pytest.mark.parametrize("case", CASES)
def test_their_config_class_parses_our_export(crosscheck, case):
    ours, _, report = crosscheck[case]
    config = report["config"]
    assert report["speculators"] == "0.9.0" and report["transformers"].startswith("5.19")
    assert config["type"] == "DSparkSpeculatorConfig" and config["speculators_model_type"] == "dspark"
    assert config["sample_from_anchor"] is True and config["layer_config_type"] == "Qwen3Config"
    assert config["speculative_tokens"] == config["block_size"]
    expected_ids = {"rnn": [2, 4], "deepspec_qwen3_rnn": [1, 3]}.get(case, [1, 3])  # our layer id + 1
    assert config["aux_hidden_state_layer_ids"] == expected_ids
    assert config["draft_vocab_size"] == ours["draft_logits"].shape[-1]


@pytest.mark.parametrize("case", CASES)
def test_their_model_loads_our_weights_without_missing_or_unexpected_keys(crosscheck, case):
    _, _, report = crosscheck[case]
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []
    assert set(report["missing_keys_filled_from_verifier"]) <= {"embed_tokens.weight", "lm_head.weight",
                                                                "verifier_lm_head.weight", "verifier_norm.weight"}
    assert report["tensors_differing_after_from_pretrained"] == [] and report["nan_tensors"] == []
    assert report["attn_implementation"] == "simple_flex_attention"


@pytest.mark.parametrize("case", CASES)
def test_one_drafting_block_matches_theirs(crosscheck, case):
    ours, theirs, _ = crosscheck[case]
    blocks, block_size, vocab = ours["draft_logits"].shape
    logits = theirs["logits"].view(blocks, block_size, vocab)
    diff = (logits - ours["draft_logits"]).abs().max().item()
    assert diff <= ATOL, f"{case}: Markov-corrected logits differ by {diff:.2e}"
    conf = theirs["confidence_logits"].view(blocks, block_size)
    diff = (conf - ours["confidence"]).abs().max().item()
    assert diff <= ATOL, f"{case}: confidence logits differ by {diff:.2e}"
    if "deepspec_draft_logits" in ours:  # three implementations agree
        assert (logits - ours["deepspec_draft_logits"]).abs().max().item() <= ATOL
        assert (conf - ours["deepspec_confidence"]).abs().max().item() <= ATOL
