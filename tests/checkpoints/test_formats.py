"""Every checkpoint format a user may arrive with goes through one loader, and the converters
round-trip: DeepSpec folders (the fixtures) <-> our Hub layout, our exports in DeepSpec / vLLM /
SGLang / speculators layouts -> load back bit for bit. The cross-check against speculators' own
code is tests/checkpoints/test_speculators_crosscheck.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _fixtures import DEEPSPEC_FIXTURES as FIXTURES
from _fixtures import require_deepspec_fixtures
from _models import tiny_drafter, tiny_gemma4_target, tiny_qwen3_target
from safetensors.torch import load_file

from hf_dspark import DSparkDraftModel, load_drafter
from hf_dspark.cli import main
from hf_dspark.checkpoints.convert import convert_checkpoint
from hf_dspark.errors import CheckpointError, DSparkConfigError
from hf_dspark.checkpoints.export import export_drafter
from hf_dspark.checkpoints.loading import detect_checkpoint_format

TARGET_NAME = "tiny-org/tiny-target"
# DSparkConfig fields that define the drafter and its use; a round trip must restore every one.
DRAFTER_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
    "attention_bias", "target_layer_ids", "num_target_layers", "target_hidden_size", "context_input_norm",
    "block_size", "mask_token_id", "markov_rank", "markov_head_type", "enable_confidence_head",
    "confidence_head_with_markov", "draft_vocab_size", "target_model_name", "confidence_temperatures",
    "prompt_chat_template", "backbone_type", "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
    "final_logit_softcapping", "num_anchors", "loss_decay_gamma", "ce_loss_alpha", "l1_loss_alpha",
    "confidence_head_alpha",
)


def _saved(folder: Path, target, **overrides) -> Path:
    settings = dict(target_model_name=TARGET_NAME, context_input_norm=False)
    settings.update(overrides)
    draft = tiny_drafter(target, **settings)
    draft.config.confidence_temperatures = [1.0, 1.1, 1.2, 1.3, 1.4]
    draft.config.prompt_chat_template = False
    draft.save_pretrained(folder)
    return folder


def assert_same_drafter(loaded, original, fields=DRAFTER_FIELDS):
    ours, theirs = loaded.state_dict(), original.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    for field in fields:
        if field == "confidence_head_with_markov" and not original.config.enable_confidence_head:
            continue  # meaningless without a confidence head (engine layouts write false)
        assert getattr(loaded.config, field) == getattr(original.config, field), field


# ----------------------------------------------------------------------------- DeepSpec folders
# Without ../shared each DeepSpec test below fails in require_deepspec_fixtures() (it skips only outside CI
# with HF_DSPARK_ALLOW_MISSING_SHARED=1): they cannot vanish unnoticed, and the other format tests still run.
@pytest.mark.parametrize("fixture_dir", FIXTURES or [None], ids=[p.name for p in FIXTURES] or ["no-fixtures"])
def test_deepspec_folder_loads_converts_and_exports_back_bit_for_bit(tmp_path, fixture_dir):
    require_deepspec_fixtures()
    source = json.loads((fixture_dir / "config.json").read_text())
    assert detect_checkpoint_format(source) == "deepspec"
    draft = load_drafter(fixture_dir)
    assert draft.checkpoint_format == "deepspec" and not draft.config.embeddings_from_target
    hub = convert_checkpoint(fixture_dir, tmp_path / "hub", "deepspec", target_model_name=TARGET_NAME)
    config = json.loads((hub / "config.json").read_text())
    assert config["model_type"] == "dspark" and "auto_map" in config
    assert (hub / "modeling_dspark_gemma4.py").is_file()
    reloaded = load_drafter(hub)
    assert reloaded.checkpoint_format == "hf-dspark"
    assert_same_drafter(reloaded, draft, [f for f in DRAFTER_FIELDS if f != "target_model_name"])
    # ... and back to DeepSpec's layout: the same tensors, and every field DeepSpec wrote is restored
    back = export_drafter(hub, tmp_path / "deepspec", format="deepspec")
    original, exported = load_file(fixture_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    written = json.loads((back / "config.json").read_text())
    ignored = {"transformers_version", "dtype", "use_cache", "max_window_layers", "use_sliding_window", "sliding_window",
               "vocab_size_per_layer_input", "moe_intermediate_size", "num_experts", "top_k_experts",
               "use_bidirectional_attention", "rope_parameters"}  # not read by the drafter
    for key, value in source.items():
        if key not in ignored:
            assert written.get(key) == value, key
    assert written["rope_parameters"].get("full_attention", written["rope_parameters"]) == \
        source["rope_parameters"].get("full_attention", source["rope_parameters"])


def test_hub_conversion_of_every_fixture_reproduces_deepspec_with_transformers_alone(tmp_path):
    """AutoModel.from_pretrained(converted, trust_remote_code=True), without hf_dspark importable,
    reproduces DeepSpec's reference inference outputs."""
    require_deepspec_fixtures()
    folders = [str(convert_checkpoint(f, tmp_path / f.name, "deepspec", target_model_name=TARGET_NAME)) for f in FIXTURES]
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_dspark"] = None  # any import of hf_dspark now fails
        import torch
        from pathlib import Path
        from safetensors.torch import load_file
        from transformers import AutoModel
        for folder, fixture in zip({folders!r}, {[str(f) for f in FIXTURES]!r}):
            draft = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
            assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
            ref = load_file(Path(fixture) / "reference.safetensors")
            cache = sys.modules[type(draft).__module__].DSparkDraftCache(draft.config.num_hidden_layers)
            worst = 0.0
            with torch.no_grad():
                for step in ("step1", "step2"):
                    anchor = ref[step + "_draft_input_ids"][:, 0]
                    out = draft.draft_block(anchor, ref[step + "_target_hidden_states"], cache)
                    tokens, corrected, conf = draft.sample_block(out.base_logits, out.hidden_states, anchor)
                    assert torch.equal(tokens, ref[step + "_greedy_tokens"])
                    for name, ours in (("corrected_logits", corrected), ("confidence_logits", conf),
                                       ("block_hidden", out.hidden_states)):
                        worst = max(worst, (ours - ref[step + "_" + name]).abs().max().item())
            print("MAXDIFF", Path(fixture).name, worst)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("MAXDIFF")}
    assert sorted(diffs) == sorted(f.name for f in FIXTURES)
    assert max(diffs.values()) <= 1e-5, diffs


def test_cli_convert_and_every_draft_option_accept_deepspec_folders(tmp_path, capsys):
    require_deepspec_fixtures()
    fixture = next(f for f in FIXTURES if f.name == "qwen3_vanilla")
    assert main(["convert", "--from", "deepspec", str(fixture), "--output", str(tmp_path / "hub"),
                 "--target-name", TARGET_NAME]) == 0
    assert "converted" in capsys.readouterr().out
    # the wrong --from names the format the folder is in
    assert main(["convert", "--from", "speculators", str(fixture), "--output", str(tmp_path / "x")]) == 2
    assert "pass --from deepspec" in capsys.readouterr().err
    # export straight from the DeepSpec folder (the target name is not recorded there)
    assert main(["export", "--draft", str(fixture), "--output", str(tmp_path / "no_name")]) == 2
    assert "--target-name" in capsys.readouterr().err
    assert main(["export", "--draft", str(fixture), "--output", str(tmp_path / "spec"), "--format", "speculators",
                 "--target-name", TARGET_NAME]) == 0
    # eval's loader: a DeepSpec folder is a DSpark drafter, bound to a matching target
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_dspark.commands.eval import _load_drafter

    target_config = json.loads((fixture.parent / "target_config.json").read_text())
    target = Qwen3ForCausalLM(Qwen3Config(**target_config)).eval()
    draft = _load_drafter(str(fixture), target, torch.device("cpu"), torch.float32)
    assert isinstance(draft, DSparkDraftModel) and draft.is_bound


def test_non_dspark_folders_are_refused_by_what_they_are(tmp_path):
    target = tiny_qwen3_target()
    target.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="'qwen3' model .*Qwen3ForCausalLM.*not a DSpark drafter"):
        load_drafter(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="speculators 'eagle3' checkpoint"):
        detect_checkpoint_format({"speculators_model_type": "eagle3"})
    with pytest.raises(ValueError, match="speculators' format.*load_drafter"):
        DSparkDraftModel.config_class(speculators_model_type="dspark")


# ----------------------------------------------------------------------------- our exports load back
@pytest.mark.parametrize(
    "fmt, overrides",
    [
        ("vllm", {}),
        ("sglang", dict(markov_head_type="rnn")),
        ("deepspec", dict(markov_head_type="gated")),
        ("deepspec", dict(markov_head_type="rnn", enable_confidence_head=False)),
        ("speculators", {}),
        ("speculators", dict(markov_head_type="rnn")),
    ],
    ids=["vllm", "sglang-rnn", "deepspec-gated", "deepspec-rnn-noconf", "speculators", "speculators-rnn"],
)
def test_export_loads_back_bit_for_bit(tmp_path, fmt, overrides):
    target = tiny_qwen3_target()
    folder = _saved(tmp_path / "draft", target, **overrides)
    original = DSparkDraftModel.from_pretrained(folder)
    out = export_drafter(folder, tmp_path / fmt, format=fmt)
    loaded = load_drafter(out)
    assert loaded.checkpoint_format == ("speculators" if fmt == "speculators" else "deepspec")
    assert_same_drafter(loaded, original)
    # and the re-converted Hub folder still drafts losslessly
    hub = convert_checkpoint(out, tmp_path / "hub", "speculators" if fmt == "speculators" else "deepspec")
    draft = load_drafter(hub, target=target)
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(target.generate(ids, max_new_tokens=12, do_sample=False),
                       target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft))


@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
def test_reduced_vocabulary_exports_load_back_bit_for_bit(tmp_path, fmt):
    target = tiny_qwen3_target()
    target.save_pretrained(tmp_path / "target")
    vocab_ids = [0, 1, 2] + list(range(10, 90, 2))
    folder = _saved(tmp_path / "draft", target, draft_vocab_size=len(vocab_ids), draft_token_ids=vocab_ids)
    original = DSparkDraftModel.from_pretrained(folder)
    out = export_drafter(folder, tmp_path / fmt, format=fmt, target=tmp_path / "target")
    stored = load_file(out / "model.safetensors")
    assert stored["t2d"].dtype == torch.bool and torch.equal(stored["d2t"] + torch.arange(len(vocab_ids)),
                                                             torch.tensor(vocab_ids))
    assert stored["markov_head.markov_w1.weight"].shape[0] == 96  # indexed by target ids
    assert_same_drafter(load_drafter(out), original)


def test_deepspec_export_with_target_stores_the_targets_tables(tmp_path):
    target = tiny_qwen3_target()
    target.save_pretrained(tmp_path / "target")
    folder = _saved(tmp_path / "draft", target)
    out = export_drafter(folder, tmp_path / "deepspec", format="deepspec", target=tmp_path / "target")
    stored = load_file(out / "model.safetensors")
    assert torch.equal(stored["embed_tokens.weight"], target.model.embed_tokens.weight.detach())
    assert torch.equal(stored["lm_head.weight"], target.lm_head.weight.detach())
    assert json.loads((out / "config.json").read_text())["embeddings_from_target"] is False
    loaded = load_drafter(out, target=target)
    assert not loaded.config.embeddings_from_target
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(target.generate(ids, max_new_tokens=12, do_sample=False),
                       target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=loaded))


def test_gemma4_drafter_exports_to_deepspec_layout_and_back(tmp_path):
    target = tiny_gemma4_target(attention_k_eq_v=True)
    folder = _saved(tmp_path / "draft", target, markov_head_type="rnn")
    original = DSparkDraftModel.from_pretrained(folder)
    out = export_drafter(folder, tmp_path / "deepspec", format="deepspec")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Gemma4DSparkModel"] and written["model_type"] == "gemma4_text"
    assert written["attention_k_eq_v"] is True and written["global_head_dim"] == 32
    assert written["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    assert_same_drafter(load_drafter(out), original)
    from hf_dspark.checkpoints.export import upload_plan

    assert "model.safetensors" in dict(upload_plan(out))  # pushable like the other exports
    for fmt in ("vllm", "sglang", "speculators"):
        with pytest.raises(DSparkConfigError, match="backbone_type"):
            export_drafter(folder, tmp_path / fmt, format=fmt)


@pytest.mark.parametrize("fmt", ["deepspec", "vllm", "sglang", "speculators"])
def test_context_input_norm_is_refused_outside_the_hub_layout(tmp_path, fmt):
    folder = _saved(tmp_path / "draft", tiny_qwen3_target(), context_input_norm=True)
    with pytest.raises(DSparkConfigError, match="context_input_norm"):
        export_drafter(folder, tmp_path / fmt, format=fmt)
    assert not (tmp_path / fmt).exists()


def test_speculators_config_uses_their_layer_ids_and_block_layout(tmp_path):
    target = tiny_qwen3_target()
    folder = _saved(tmp_path / "draft", target, target_layer_ids=[0, 3])
    out = export_drafter(folder, tmp_path / "spec", format="speculators")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "dspark"
    assert config["aux_hidden_state_layer_ids"] == [1, 4]  # hidden_states index = our layer id + 1
    assert config["sample_from_anchor"] is True
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert config["speculators_config"]["verifier"]["name_or_path"] == TARGET_NAME
    assert config["draft_vocab_size"] == 96 and config["transformer_layer_config"]["model_type"] == "qwen3"
    assert not any(k.startswith(("embed_tokens", "lm_head", "d2t", "t2d")) for k in load_file(out / "model.safetensors"))
    from hf_dspark.checkpoints.export import upload_plan

    assert "model.safetensors" in dict(upload_plan(out))  # pushable like the other exports
