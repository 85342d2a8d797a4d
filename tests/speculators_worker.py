"""Runs INSIDE the separate speculators virtual environment (speculators 0.9.0, transformers 5.19),
driven by tests/checkpoints/test_speculators_crosscheck.py; it must not import hf_dspark.

Usage: python speculators_worker.py CASES.json, a list of {"checkpoint", "inputs", "output", "report", "attn"}
(``attn``: "default" keeps speculators' own attention implementation, simple_flex_attention).

1. speculators' own config class parses the exported config.json;
2. speculators' own DSparkDraftModel takes the exported state dict: missing keys (beyond the ones
   speculators itself fills from the verifier) and unexpected keys are reported; then
   ``DSparkDraftModel.from_pretrained`` loads the folder, filling embed_tokens / lm_head from the
   verifier named in the config;
3. one training-style forward of speculators' DSpark model on fixed inputs, with the anchors
   given (select_anchors replaced) and the Markov-corrected logits and confidence logits captured
   where speculators hands them to its loss (compute_metrics replaced by a recorder).
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def run_case(checkpoint: str, inputs: str, output: str, report: str, attn: str) -> None:
    from importlib.metadata import version

    from speculators.models.dspark import DSparkDraftModel, DSparkSpeculatorConfig
    from speculators.models.dflash import core as dflash_core
    from speculators.models.dspark import core as dspark_core

    facts: dict = {name: version(name) for name in ("speculators", "transformers", "torch")}

    # 1. config
    config = DSparkSpeculatorConfig.from_pretrained(checkpoint)
    facts["config"] = {
        "type": type(config).__name__,
        "speculators_model_type": config.speculators_model_type,
        "aux_hidden_state_layer_ids": list(config.aux_hidden_state_layer_ids),
        "block_size": config.block_size,
        "draft_vocab_size": config.draft_vocab_size,
        "sample_from_anchor": config.sample_from_anchor,
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": config.enable_confidence_head,
        "confidence_head_with_markov": config.confidence_head_with_markov,
        "mask_token_id": config.mask_token_id,
        "speculative_tokens": config.speculators_config.proposal_methods[0].speculative_tokens,
        "verifier": config.speculators_config.verifier.name_or_path,
        "layer_config_type": type(config.transformer_layer_config).__name__,
    }

    # 2. state dict
    stored = load_file(f"{checkpoint}/model.safetensors")
    fresh = DSparkDraftModel(config)
    missing, unexpected = fresh.load_state_dict(stored, strict=False)
    ignored = set(fresh._keys_to_ignore_on_load_missing)
    facts["missing_keys"] = sorted(k for k in missing if k not in ignored)
    facts["missing_keys_filled_from_verifier"] = sorted(k for k in missing if k in ignored)
    facts["unexpected_keys"] = sorted(unexpected)
    if attn != "default":
        config.transformer_layer_config._attn_implementation = attn
    model = DSparkDraftModel.from_pretrained(checkpoint, config=config).eval()
    facts["attn_implementation"] = model._attn_impl
    state = model.state_dict()
    facts["tensors_differing_after_from_pretrained"] = sorted(k for k, v in stored.items() if not torch.equal(state[k], v))
    facts["nan_tensors"] = sorted(k for k, v in state.items() if v.is_floating_point() and torch.isnan(v).any())

    # 3. forward on fixed inputs with given anchors
    x = load_file(inputs)
    anchors = x["anchors"].view(-1)
    dflash_core.select_anchors = lambda loss_mask, num_anchors, block_size: (
        anchors.clone(), torch.ones(num_anchors, dtype=torch.bool))
    captured = {}

    def record(logits, targets, confidence_logits, *args, **kwargs):
        captured["logits"], captured["confidence_logits"] = logits.detach().clone(), confidence_logits
        return torch.zeros(()), {}

    dspark_core.compute_metrics = record
    ids = x["input_ids"]
    with torch.no_grad():
        model(
            hidden_states=x["hidden_states"],
            input_ids=ids,
            loss_mask=torch.ones_like(ids),
            verifier_last_hidden_states=x["last"],
            document_ids=torch.zeros_like(ids),
            max_anchors=anchors.numel(),
        )
    out = {"logits": captured["logits"].contiguous()}
    if captured["confidence_logits"] is not None:
        out["confidence_logits"] = captured["confidence_logits"].detach().contiguous()
    save_file(out, output)
    with open(report, "w") as handle:
        json.dump(facts, handle, indent=2)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        for case in json.load(handle):
            run_case(**case)
