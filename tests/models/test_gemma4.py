"""Gemma 4 drafters (DeepSpec's Gemma4DSparkModel backbone): built for, trained on and decoding
losslessly with a tiny random Gemma 4 target; DeepSpec's Gemma 4 checkpoints drafting for a Gemma 4
target; the Hub export running with transformers alone; unsupported variants refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _models import briefly_trained_drafter, tiny_drafter, tiny_gemma4_target
from _fixtures import DEEPSPEC_FIXTURES as FIXTURES
from _fixtures import DEEPSPEC_ROOT as ROOT
from _fixtures import require_deepspec_fixtures

from hf_dspark import DSparkConfig, DSparkDraftModel
from hf_dspark.losses import dspark_loss


def prompts(n, vocab=90, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=gen) for _ in range(n)]


@pytest.fixture(scope="module", params=[False, True], ids=["kv", "k_eq_v"])
def gemma4(request):
    return tiny_gemma4_target(attention_k_eq_v=request.param)


def test_from_target_builds_gemma4_layers_with_the_targets_full_attention_geometry(gemma4):
    draft = tiny_drafter(gemma4)
    cfg, tcfg = draft.config, gemma4.config
    assert cfg.backbone_type == "gemma4"
    assert cfg.global_head_dim == 32 and cfg.attention_head_dim == 32 and cfg.head_dim == 16
    assert cfg.attention_k_eq_v == tcfg.attention_k_eq_v
    assert cfg.final_logit_softcapping == 30.0 and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.rope_parameters == tcfg.rope_parameters["full_attention"]
    attn = draft.layers[0].self_attn
    assert type(attn).__name__ == "DSparkGemma4Attention" and attn.scaling == 1.0
    assert hasattr(attn, "v_proj") != tcfg.attention_k_eq_v
    assert not hasattr(attn.v_norm, "weight") and hasattr(attn.k_norm, "weight")
    assert draft.layers[0].layer_scalar.tolist() == [1.0]
    # A Qwen3-style backbone can still be asked for explicitly.
    assert tiny_drafter(gemma4, backbone_type="qwen3").config.backbone_type == "qwen3"


def test_rope_matches_the_targets_full_attention_rope(gemma4):
    """The drafter's 'proportional' RoPE equals the target's own full-attention rotary embedding."""
    draft = tiny_drafter(gemma4)
    positions = torch.arange(40)[None]
    ours = draft.rotary_emb(positions, torch.float32)
    x = torch.zeros(1, 40, 32)
    theirs = gemma4.model.rotary_emb(x, positions, "full_attention")
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-6)
    # only 8 of the 16 frequency pairs rotate (partial_rotary_factor 0.25 of 32 dims = 4 pairs)
    rotated = (ours[1][0] != 0).any(0)
    assert rotated.tolist() == ([True] * 4 + [False] * 12) * 2


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_greedy_equals_plain_generate(gemma4, head):
    draft = tiny_drafter(gemma4, markov_head_type=head)
    for ids in prompts(2, seed=3):
        plain = gemma4.generate(ids, max_new_tokens=20, do_sample=False)
        spec = gemma4.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec), head
        assert draft.last_generation_stats["rounds"] > 0


def _loss(draft, target, seqs, anchors):
    with torch.no_grad():
        out = target(seqs, output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i + 1] for i in draft.config.target_layer_ids], dim=-1)
        o = draft(seqs, feats, anchor_positions=anchors)
        pos = (anchors[..., None] + torch.arange(draft.config.block_size)).clamp(max=seqs.shape[1] - 1)
        tl = torch.gather(out.logits, 1, pos.flatten(1)[..., None].expand(-1, -1, out.logits.shape[-1]))
        return dspark_loss(o.draft_logits, o.confidence_logits, o.target_ids, o.eval_mask, o.block_keep_mask,
                           target_logits=tl.view(*pos.shape, -1)).loss.item()


def test_training_changes_weights_lowers_loss_and_accepts_more(gemma4):
    train_prompts = prompts(3, seed=5)
    before = tiny_drafter(gemma4, seed=0, scale=0.1)  # the starting point of briefly_trained_drafter
    trained = briefly_trained_drafter(gemma4, train_prompts, steps=60)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before.state_dict()[n])]
    assert any(n.startswith("layers.0.self_attn") for n in changed) and "markov_head.markov_w2.weight" in changed
    seqs = torch.cat([gemma4.generate(p, max_new_tokens=40, min_new_tokens=40, do_sample=False) for p in train_prompts])
    anchors = torch.tensor([[8, 14, 20, 26, 32]] * seqs.shape[0])
    loss_before, loss_after = _loss(before, gemma4, seqs, anchors), _loss(trained, gemma4, seqs, anchors)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    accepted = {"before": [], "trained": []}
    for ids in train_prompts:
        plain = gemma4.generate(ids, max_new_tokens=30, do_sample=False)
        for name, draft in (("before", before), ("trained", trained)):
            spec = gemma4.generate(ids, max_new_tokens=30, do_sample=False, assistant_model=draft)
            assert torch.equal(plain, spec), name
            accepted[name].append(draft.last_generation_stats["mean_accepted_length"])
    mean = {name: sum(v) / len(v) for name, v in accepted.items()}
    # a random Gemma 4 target is hard to predict: measured 1.02 -> 1.74 (kv) and 1.00 -> 1.42 (k_eq_v)
    assert mean["trained"] > mean["before"] + 0.25, accepted


GEMMA4_FIXTURES = [p for p in FIXTURES if json.loads((p / "config.json").read_text())["model_type"] == "gemma4_text"]


def test_the_gemma4_reference_fixtures_are_present():
    """The parametrized reference tests below would silently vanish without them."""
    require_deepspec_fixtures()
    assert GEMMA4_FIXTURES, f"no gemma4_text fixture under {ROOT}"


def _fixture_target(fixture_dir: Path):
    """A random Gemma 4 target with the fixture's target config (README: which file)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    name = "target_config_gemma4_keqv.json" if "keqv" in fixture_dir.name else "target_config_gemma4.json"
    text = json.loads((ROOT / name).read_text())["text_config"]
    torch.manual_seed(0)
    target = Gemma4ForCausalLM(Gemma4TextConfig(**text)).eval()
    target.generation_config.do_sample = False
    return target


@pytest.mark.parametrize("fixture_dir", GEMMA4_FIXTURES, ids=[p.name for p in GEMMA4_FIXTURES])
def test_deepspec_gemma4_checkpoint_drafts_losslessly_for_a_gemma4_target(fixture_dir):
    target = _fixture_target(fixture_dir)
    draft = DSparkDraftModel.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    assert draft.config.attention_k_eq_v == target.config.attention_k_eq_v
    for ids in prompts(2, vocab=500, seed=11):
        plain = target.generate(ids, max_new_tokens=16, do_sample=False)
        spec = target.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec)


def test_hub_export_of_a_gemma4_drafter_generates_with_transformers_alone(tmp_path):
    from hf_dspark.checkpoints.export import export_drafter

    target = tiny_gemma4_target(attention_k_eq_v=True)
    target.save_pretrained(tmp_path / "target")
    draft = tiny_drafter(target, markov_head_type="rnn", target_model_name="tiny-org/tiny-gemma4")
    draft.save_pretrained(tmp_path / "draft")
    out = export_drafter(tmp_path / "draft", tmp_path / "hub")
    assert (out / "modeling_dspark_gemma4.py").is_file()
    assert json.loads((out / "config.json").read_text())["backbone_type"] == "gemma4"
    ids = prompts(1, seed=7)[0]
    expected = target.generate(ids, max_new_tokens=12, do_sample=False)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_dspark"] = None  # any import of hf_dspark now fails
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        target = AutoModelForCausalLM.from_pretrained({str(tmp_path / "target")!r}).eval()
        draft = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(draft.layers[0]).__name__ == "DSparkGemma4DecoderLayer"
        ids = torch.tensor({ids.tolist()})
        spec = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
        print("OUT", spec.tolist())
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OUT {expected.tolist()}" in proc.stdout


@pytest.mark.parametrize(
    "field, value",
    [("enable_moe_block", True), ("hidden_size_per_layer_input", 256), ("num_kv_shared_layers", 2),
     ("layer_types", ["sliding_attention"])],
)
def test_unsupported_gemma4_variants_are_refused_by_name(field, value):
    base = dict(model_type="gemma4_text", vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, global_head_dim=32, target_layer_ids=[0], num_target_layers=2, mask_token_id=63)
    DSparkConfig(**base)  # the base is valid
    with pytest.raises(ValueError, match=field):
        DSparkConfig(**base, **{field: value})


def test_train_cli_and_export_for_a_gemma4_target(tmp_path):
    """`hf-dspark train` builds a Gemma 4 drafter for a Gemma 4 target, trains it (loss goes down), and
    `hf-dspark export` ships it in the Hub and DeepSpec layouts, both drafting losslessly."""
    from _models import BOS_ID, PAD_ID, build_tiny_tokenizer

    from hf_dspark import load_drafter
    from hf_dspark.cli import main

    target = tiny_gemma4_target(vocab_size=128)
    target.save_pretrained(tmp_path / "target")
    build_tiny_tokenizer().save_pretrained(tmp_path / "target")
    prompts_ = torch.randint(6, 128, (16, 6), generator=torch.Generator().manual_seed(0))
    prompts_[:, 0] = BOS_ID
    with torch.no_grad():
        rows = target.generate(prompts_, attention_mask=torch.ones_like(prompts_), do_sample=False, max_new_tokens=30,
                               min_new_tokens=30, pad_token_id=PAD_ID).tolist()
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as handle:
        for i, ids in enumerate(rows):
            handle.write(json.dumps({"id": f"r{i}", "prompt": "p", "input_ids": ids, "loss_mask": [0] * 6 + [1] * 30,
                                     "num_prompt_tokens": 6, "num_answer_tokens": 30, "answer": "a"}) + "\n")
    (data / "data_config.json").write_text(json.dumps({"format_version": 1, "chat_template": False}))
    assert main(["train", "--target", str(tmp_path / "target"), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--max_steps", "20", "--logging_steps", "5", "--target_layer_ids", "0", "2", "--target_topk", "0",
                 "--block_size", "4", "--markov_rank", "8", "--num_anchors", "16", "--per_device_train_batch_size", "4",
                 "--learning_rate", "3e-3", "--context_input_norm", "false", "--disable_tqdm", "true",
                 "--threads", "1", "--report_to", "none"]) == 0
    run = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert run["final_metrics"]["loss"] < run["first_logged_metrics"]["loss"], run
    draft = load_drafter(tmp_path / "out", target=target)
    assert draft.config.backbone_type == "gemma4" and type(draft.layers[0]).__name__ == "DSparkGemma4DecoderLayer"
    ids = torch.tensor([rows[0][:6]])
    plain = target.generate(ids, max_new_tokens=16, do_sample=False)
    for fmt in ("hub", "deepspec"):
        assert main(["export", "--draft", str(tmp_path / "out"), "--output", str(tmp_path / fmt), "--format", fmt]) == 0
        shipped = load_drafter(tmp_path / fmt, target=target)
        assert torch.equal(plain, target.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=shipped)), fmt


def test_sampling_with_a_gemma4_drafter_follows_the_target_distribution(monkeypatch):
    """Sampled outputs keep the target's distribution (chi-square against the exact joint of two tokens),
    and the same test rejects a generator that misreports the draft distribution (negative control)."""
    import hf_dspark
    from _fixtures import chi_square_rejects, exact_joint, sample_counts

    target = tiny_gemma4_target(seed=7, vocab_size=6)
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=3, block_size=4, markov_rank=4, mask_token_id=5, markov_head_type="rnn")
    with torch.no_grad():
        for p in draft.parameters():
            if p.is_floating_point():
                p.mul_(3.0)  # a draft distribution clearly different from the target's
    draft.generation_config.verification_policy = "full"
    ids = torch.tensor([[1, 3, 2, 4]])
    warp = dict(temperature=1.0, top_k=0, top_p=1.0)
    exact = exact_joint(target, ids, warp)
    rejects, stat, crit = chi_square_rejects(sample_counts(target, draft, ids, warp, runs=600), exact)
    assert not rejects, f"speculative samples deviate from the target: chi2={stat:.1f} > {crit:.1f}"
    assert draft.last_generation_stats["submitted_lengths"][0] == 2  # the draft really proposed tokens

    generator = hf_dspark.models.dspark.generation_dspark.DSparkCandidateGenerator
    original = generator.get_candidates

    def lying(self, *args, **kwargs):
        candidates, logits = original(self, *args, **kwargs)
        return candidates, None if logits is None else torch.zeros_like(logits)  # claims q is uniform

    monkeypatch.setattr(generator, "get_candidates", lying)
    assert chi_square_rejects(sample_counts(target, draft, ids, warp, runs=300), exact)[0]


def test_batched_engine_with_a_gemma4_drafter_equals_plain_generate():
    from hf_dspark import BatchedSpeculativeGenerator, DSparkGenerationConfig

    target = tiny_gemma4_target(attention_k_eq_v=True)
    draft = tiny_drafter(target, markov_head_type="rnn")
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(3, 90, (n,), generator=gen).tolist() for n in (5, 9, 7)]
    expected = [target.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
                for p in batch]
    assert BatchedSpeculativeGenerator(target, draft, generation_config=DSparkGenerationConfig(verification_policy="full"), max_batch_size=3).generate(batch, 16) == expected
