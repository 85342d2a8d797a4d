"""The drafter as a transformers model: config validation, from_target, save/load, remote code, heads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _models import target_features, tiny_drafter, tiny_gemma3_target, tiny_qwen3_target
from transformers import AutoConfig, AutoModel

from hf_dspark import DSparkConfig, DSparkDraftCache, DSparkDraftModel


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(target_layer_ids=[2, 1]), "target_layer_ids"),
        (dict(target_layer_ids=[0, 9], num_target_layers=4), "target_layer_ids"),
        (dict(block_size=1), "block_size"),
        (dict(markov_head_type="lstm"), "markov_head_type"),
        (dict(draft_vocab_size=1000, vocab_size=100, mask_token_id=5), "draft_vocab_size"),
        (dict(mask_token_id=100, vocab_size=100), "mask_token_id"),
        (dict(confidence_temperatures=[1.0, 1.0]), "confidence_temperatures"),
    ],
)
def test_config_validation_names_field_value_and_fix(overrides, field):
    with pytest.raises(ValueError, match=rf"DSparkConfig\.{field}=.* is invalid: "):
        DSparkConfig(**overrides)


def test_config_is_registered_with_auto_classes():
    assert AutoConfig.for_model("dspark").__class__ is DSparkConfig
    cfg = DSparkConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    assert isinstance(AutoModel.from_config(cfg), DSparkDraftModel)


# ----------------------------------------------------------------------------- from_target
@pytest.mark.parametrize("make_target", [tiny_qwen3_target, tiny_gemma3_target], ids=["qwen3", "gemma3"])
def test_from_target_reads_the_target(make_target):
    target = make_target()
    draft = DSparkDraftModel.from_target(target, num_hidden_layers=2)
    cfg, tcfg = draft.config, target.config
    assert cfg.hidden_size == tcfg.hidden_size and cfg.vocab_size == tcfg.vocab_size
    assert cfg.num_target_layers == tcfg.num_hidden_layers
    assert cfg.block_size == 7 and cfg.num_hidden_layers == 2
    assert all(-1 <= i < tcfg.num_hidden_layers for i in cfg.target_layer_ids)
    assert cfg.embeddings_from_target
    # the embedding table / LM head are borrowed, not parameters of the drafter
    names = [n for n, _ in draft.named_parameters()]
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)
    assert draft.embed(torch.tensor([[3]])).shape == (1, 1, tcfg.hidden_size)


def test_overrides_win_and_draft_vocab_maps_back():
    target = tiny_qwen3_target()
    ids = list(range(10, 60))
    draft = DSparkDraftModel.from_target(target, block_size=4, markov_rank=16, draft_token_ids=ids)
    assert draft.config.block_size == 4 and draft.config.draft_vocab_size == 50
    assert draft.draft_to_target.tolist() == ids
    table = draft.target_to_draft_table()
    assert table[10].item() == 0 and table[59].item() == 49 and table[5].item() == -1


def test_reduced_vocab_probabilities_sum_to_one_and_map_to_target_ids():
    target = tiny_qwen3_target()
    ids = list(range(20, 70))
    draft = tiny_drafter(target, draft_token_ids=ids)
    seq = torch.randint(3, 90, (1, 12))
    with torch.no_grad():
        cache = DSparkDraftCache(1)
        block = draft.draft_block(seq[:, -1], target_features(target, seq[:, :-1], draft.config.target_layer_ids), cache)
        assert block.base_logits.shape[-1] == 50
        tokens, logits, _ = draft.sample_block(block.base_logits, block.hidden_states, seq[:, -1])
    probs = logits.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    assert all(t in ids for t in tokens.flatten().tolist())
    # the draft head is the target LM head restricted to the draft vocabulary
    torch.testing.assert_close(
        block.base_logits, target.lm_head(block.hidden_states)[..., ids], atol=1e-5, rtol=1e-5
    )


# ----------------------------------------------------------------------------- heads
def test_markov_rank_zero_is_a_plain_parallel_drafter():
    target = tiny_qwen3_target()
    draft = tiny_drafter(target, markov_rank=0)
    assert draft.markov_head is None
    seq = torch.randint(3, 90, (1, 10))
    with torch.no_grad():
        block = draft.draft_block(seq[:, -1], target_features(target, seq[:, :-1], [0, 2]), DSparkDraftCache(1))
        tokens, logits, _ = draft.sample_block(block.base_logits, block.hidden_states, seq[:, -1])
    torch.testing.assert_close(logits, block.base_logits)  # no correction at all
    assert torch.equal(tokens, block.base_logits.argmax(-1))  # each position decided independently


def test_vanilla_markov_bias_depends_only_on_previous_token():
    target = tiny_qwen3_target()
    draft = tiny_drafter(target, markov_head_type="vanilla")
    hidden = torch.randn(2, 5, 32)
    base = torch.randn(2, 5, 96)
    prev = torch.tensor([[4, 9, 9, 30, 4], [4, 9, 9, 30, 4]])
    logits, _ = draft.apply_heads_teacher_forced(base, hidden, prev)
    bias = logits - base
    # same previous token -> same bias, whatever the hidden state and the position
    torch.testing.assert_close(bias[0, 1], bias[0, 2])
    torch.testing.assert_close(bias[0, 0], bias[1, 4])
    torch.testing.assert_close(bias[0, 0], draft.markov_head.markov_w2(draft.markov_head.markov_w1.weight[4]))
    assert not torch.allclose(bias[0, 0], bias[0, 1])


@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_gated_and_rnn_heads_compute_their_formulas(head):
    """The bias written out from the weights: gated ``W2 (sigmoid(G [h; e] + g) * e)``; rnn
    ``W2 tanh(o_k)`` and ``s_k = sigmoid(a_k) s_{k-1} + (1 - sigmoid(a_k)) tanh(c_k)`` with
    ``[a; c; o] = J [s_{k-1}; e; h] + j`` and ``s_0 = 0``, where ``e = W1[x_{k-1}]``."""
    target = tiny_qwen3_target()
    draft = tiny_drafter(target, markov_head_type=head)
    m = draft.markov_head
    base = torch.zeros(1, 5, 96)
    prev = torch.tensor([[4, 4, 9, 4, 30]])
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    logits, _ = draft.apply_heads_teacher_forced(base, hidden, prev)
    w1, w2 = m.markov_w1.weight, m.markov_w2.weight
    expected, state = [], torch.zeros(8)
    for k in range(5):
        e, h = w1[prev[0, k]], hidden[0, k]
        if head == "gated":
            inner = torch.sigmoid(m.gate_proj.weight @ torch.cat([h, e]) + m.gate_proj.bias) * e
        else:
            a, c, o = (m.joint_proj.weight @ torch.cat([state, e, h]) + m.joint_proj.bias).split(8)
            state = torch.sigmoid(a) * state + (1 - torch.sigmoid(a)) * torch.tanh(c)
            inner = torch.tanh(o)
        expected.append(w2 @ inner)
    torch.testing.assert_close(logits[0], torch.stack(expected), atol=1e-5, rtol=1e-5)
    # unlike the vanilla head, the same previous token gives different biases at positions 0 and 1
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_training_forward_equals_inference_blocks():
    target = tiny_qwen3_target()
    draft = tiny_drafter(target, markov_head_type="gated", num_hidden_layers=2)
    seq = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(1))
    feats = target_features(target, seq, draft.config.target_layer_ids)
    anchors = torch.tensor([[3, 8, 15], [5, 6, 17]])
    with torch.no_grad():
        out = draft(seq, feats, anchor_positions=anchors)
        for b in range(2):
            for a, p in enumerate(anchors[b].tolist()):
                block = draft.draft_block(seq[b : b + 1, p], feats[b : b + 1, :p], DSparkDraftCache(2))
                prev = torch.cat([seq[b : b + 1, p : p + 1], out.target_ids[b : b + 1, a, :-1]], dim=1)
                logits, conf = draft.apply_heads_teacher_forced(block.base_logits, block.hidden_states, prev)
                torch.testing.assert_close(out.draft_logits[b, a], logits[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(out.confidence_logits[b, a], conf[0], atol=1e-5, rtol=1e-5)
                assert torch.equal(out.target_ids[b, a], seq[b, p + 1 : p + 6])


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_bit_identical(tmp_path):
    target = tiny_qwen3_target()
    draft = tiny_drafter(target, markov_head_type="rnn", draft_token_ids=list(range(30, 80)))
    draft.generation_config.verification_policy = "threshold"
    draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dspark"
    assert config["auto_map"]["AutoModel"] == "modeling_dspark.DSparkDraftModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_dspark.DSparkConfig"
    from hf_dspark.checkpoints.export import REMOTE_CODE_FILES

    for name in REMOTE_CODE_FILES:  # save_pretrained copies the modeling file's relative imports too
        assert (tmp_path / name).exists(), name
    loaded = DSparkDraftModel.from_pretrained(tmp_path).bind_target(target).eval()
    assert loaded.generation_config.verification_policy == "threshold"
    seq = torch.randint(3, 90, (2, 20))
    feats = target_features(target, seq, draft.config.target_layer_ids)
    with torch.no_grad():
        a = draft(seq, feats, anchor_positions=torch.tensor([[2, 9], [4, 11]]))
        b = loaded(seq, feats, anchor_positions=torch.tensor([[2, 9], [4, 11]]))
    assert torch.equal(a.draft_logits, b.draft_logits) and torch.equal(a.confidence_logits, b.confidence_logits)


def test_checkpoint_not_matching_its_config_is_refused(tmp_path):
    target = tiny_qwen3_target()
    tiny_drafter(target, markov_rank=8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["markov_head_type"] = "gated"  # weights have no gate_proj
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its config"):
        DSparkDraftModel.from_pretrained(tmp_path)


def test_remote_code_folder_works_without_hf_dspark(tmp_path):
    target = tiny_qwen3_target()
    draft = tiny_drafter(target)
    draft.save_pretrained(tmp_path / "draft")
    target.save_pretrained(tmp_path / "target")
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, max_new_tokens=15, do_sample=False)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_dspark"] = None  # any import of hf_dspark now fails
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        target = AutoModelForCausalLM.from_pretrained({str(tmp_path / "target")!r}).eval()
        draft = AutoModel.from_pretrained({str(tmp_path / "draft")!r}, trust_remote_code=True).eval()
        assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
        ids = torch.tensor({ids.tolist()})
        plain = target.generate(ids, max_new_tokens=15, do_sample=False)
        spec = target.generate(ids, max_new_tokens=15, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec)
        assert draft.last_generation_stats["rounds"] > 0
        print("OUT", spec.tolist())
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OUT {expected.tolist()}" in proc.stdout
