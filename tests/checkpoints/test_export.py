"""`hf-dspark export` / `push`: Hub folder that works with transformers alone, model card, round trip,
refusals, vLLM / SGLang layouts, and a push dry run without network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _models import tiny_drafter, tiny_qwen3_target
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_dspark.errors import CheckpointError, DSparkConfigError
from hf_dspark.checkpoints.export import export_drafter, upload_plan
from hf_dspark.checkpoints.model_card import render_example_card

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_NAME = "tiny-org/tiny-qwen3"

EVAL = {
    "settings": {"target": TARGET_NAME, "policy": "cost", "temperature": 0.0, "max_new_tokens": 64,
                 "hardware": "test-cpu-1core"},
    "gsm8k": {"num_prompts": 12, "mean_accepted_length": 2.87, "per_position_acceptance": [0.81, 0.55, 0.3],
              "tokens_per_second": 41.5, "baseline_tokens_per_second": 21.5, "speedup": 1.93,
              "outputs_match_baseline": True},
    "mt_bench": {"num_prompts": 8, "mean_accepted_length": 2.11, "speedup": 1.41},
    "mean_accepted_length": 2.49,
    "speedup": 1.67,
}


def _save_drafter(folder: Path, target, **overrides) -> Path:
    draft = tiny_drafter(target, target_model_name=TARGET_NAME, **overrides)
    draft.save_pretrained(folder)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny target saved to disk, a calibrated drafter with a cost-policy latency table, and its hub export."""
    root = tmp_path_factory.mktemp("export")
    target = tiny_qwen3_target()
    target.save_pretrained(root / "target")
    draft = tiny_drafter(target, target_model_name=TARGET_NAME)
    draft.config.confidence_temperatures = [1.0, 1.2, 1.4, 1.6, 1.8]
    draft.generation_config.verification_policy = "cost"
    draft.generation_config.latency_table = {"1": 0.010, "4": 0.012, "8": 0.018}
    draft.save_pretrained(root / "draft")
    (root / "eval.json").write_text(json.dumps(EVAL))
    out = export_drafter(root / "draft", root / "hub", eval_json=root / "eval.json",
                         recipe="hf-dspark train --target tiny --cache cache/ --output draft/")
    return root, target, out


# ----------------------------------------------------------------------------- hub format
def test_hub_folder_has_config_weights_code_card(exported):
    _, _, out = exported
    names = set(_files(out))
    assert {"config.json", "model.safetensors", "configuration_dspark.py", "modeling_dspark.py",
            "modeling_dspark_gemma4.py", "generation_dspark.py", "generation_config.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dspark"
    assert config["auto_map"] == {"AutoConfig": "configuration_dspark.DSparkConfig",
                                  "AutoModel": "modeling_dspark.DSparkDraftModel"}
    assert config["confidence_temperatures"] == [1.0, 1.2, 1.4, 1.6, 1.8]
    assert config["target_model_name"] == TARGET_NAME
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["verification_policy"] == "cost" and generation["latency_table"]["8"] == 0.018
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert not any(k.startswith(("embed_tokens", "lm_head")) for k in handle.keys())


def test_hub_export_generates_with_transformers_alone(exported):
    root, target, out = exported
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(1))
    expected = target.generate(ids, max_new_tokens=12, do_sample=False)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_dspark"] = None  # any import of hf_dspark now fails
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        target = AutoModelForCausalLM.from_pretrained({str(root / "target")!r}).eval()
        draft = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
        assert draft.generation_config.verification_policy == "cost"
        assert draft.config.confidence_temperatures == [1.0, 1.2, 1.4, 1.6, 1.8]
        ids = torch.tensor({ids.tolist()})
        plain = target.generate(ids, max_new_tokens=12, do_sample=False)
        spec = target.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
        assert torch.equal(plain, spec), (plain, spec)
        assert draft.last_generation_stats["rounds"] > 0
        print("OUT", spec.tolist())
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"),
               PYTHONPATH="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"OUT {expected.tolist()}" in proc.stdout


def test_model_card_metadata_and_measured_table(exported):
    from huggingface_hub import ModelCard

    _, _, out = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == TARGET_NAME
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"speculative-decoding", "dspark", "draft-model"} <= set(card.data.tags)
    text = card.text
    assert "assistant_model=draft" in text and "trust_remote_code=True" in text
    assert "hf-dspark train --target tiny --cache cache/ --output draft/" in text
    assert "test-cpu-1core" in text and "temperature `0.0`" in text and "verification policy `cost`" in text
    assert "| gsm8k | 12 | 2.87 | 1.93× | 41.5 | 21.5 | yes | 0.81 / 0.55 / 0.30 |" in text
    assert "| mt_bench | 8 | 2.11 | 1.41× | — | — | — | — |" in text
    assert "| **macro average** | — | 2.49 | 1.67× |" in text


def test_card_names_the_hub_target_and_prompts_as_the_drafter_was_trained():
    from huggingface_hub import ModelCard

    from hf_dspark import DSparkConfig
    from hf_dspark.checkpoints.model_card import render_model_card
    from hf_dspark.targets import ALIAS_HUB_IDS, GEMMA_ALIAS

    config = DSparkConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, target_layer_ids=[0, 1],
                          num_target_layers=2, target_model_name=GEMMA_ALIAS, prompt_chat_template=False)
    raw = render_model_card(config)
    card = ModelCard(raw)
    assert card.data.base_model == ALIAS_HUB_IDS[GEMMA_ALIAS]  # the Hub id, not our alias
    assert f"https://huggingface.co/{ALIAS_HUB_IDS[GEMMA_ALIAS]})" in raw
    assert "apply_chat_template" not in raw and "tokenizer(\"Question:" in raw
    config.prompt_chat_template = True
    assert "apply_chat_template" in render_model_card(config)


def test_export_load_export_gives_identical_files(exported):
    root, _, out = exported
    again = export_drafter(out, root / "hub_again")  # card inputs come from dspark_card.json
    first, second = _files(out), _files(again)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs after export -> load -> export"


def test_cli_export_and_overwrite(exported, capsys):
    from hf_dspark.cli import main

    root, _, out = exported
    dest = root / "cli_hub"
    assert main(["export", "--draft", str(root / "draft"), "--output", str(dest), "--eval-json",
                 str(root / "eval.json"), "--license", "mit", "--repo-id", "me/tiny-DSpark"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    readme = (dest / "README.md").read_text()
    assert "license: mit" in readme and 'AutoModel.from_pretrained("me/tiny-DSpark"' in readme
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_drafter(root / "draft", dest)
    export_drafter(root / "draft", dest, overwrite=True)
    assert "license: apache-2.0" in (dest / "README.md").read_text()


def test_cli_export_turns_on_ngram_rounds(exported):
    from hf_dspark import DSparkDraftModel
    from hf_dspark.cli import main

    root, target, _ = exported
    dest = root / "ngram_hub"
    assert main(["export", "--draft", str(root / "draft"), "--output", str(dest), "--ngram-lookup", "5"]) == 0
    assert json.loads((dest / "generation_config.json").read_text())["ngram_lookup_tokens"] == 5
    assert "ngram_lookup_tokens=5" in (dest / "README.md").read_text()
    draft = DSparkDraftModel.from_pretrained(dest).eval()
    motif = [11, 12, 13, 14]
    ids = torch.tensor([motif + [40, 41] + motif + motif[:2]])
    plain = target.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(plain, target.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft))
    assert draft.last_generation_stats["ngram_rounds"] > 0
    assert json.loads((root / "draft" / "generation_config.json").read_text()).get("ngram_lookup_tokens", 0) == 0
    assert main(["export", "--draft", str(root / "draft"), "--output", str(root / "bad"), "--ngram-lookup", "-2"]) == 2
    assert main(["export", "--draft", str(root / "draft"), "--output", str(root / "bad_vllm"), "--format", "vllm",
                 "--ngram-lookup", "3"]) == 2


def test_card_explains_runs_with_ngram_rounds(exported):
    from hf_dspark.checkpoints.model_card import render_model_card

    _, target, _ = exported
    config = tiny_drafter(target, target_model_name=TARGET_NAME).config
    note = "n-gram rounds included"
    with_ngram = dict(EVAL, settings=dict(EVAL["settings"], ngram_lookup_tokens=7))
    card = render_model_card(config, {"verification_policy": "full", "ngram_lookup_tokens": 7}, [EVAL, with_ngram])
    assert note in card and "n-gram lookup tokens `7`" in card and "n-gram rounds on" in card
    assert note not in render_model_card(config, {"verification_policy": "full"}, [EVAL])


def test_card_shows_compare_drafters(exported):
    from hf_dspark.checkpoints.model_card import render_model_card

    _, target, _ = exported
    config = tiny_drafter(target, target_model_name=TARGET_NAME).config
    dflash = {"mean_accepted_length": 2.31, "tokens_per_second": 30.2, "speedup": 1.4,
              "per_position_acceptance": [0.8, 0.4, 0.1], "dspark_tau_ratio": 1.2424, "dspark_tau_ratio_ci90": [1.05, 1.4]}
    gsm8k = dict(EVAL["gsm8k"], compare={"dflash": dflash})
    result = dict(EVAL, gsm8k=gsm8k, settings=dict(EVAL["settings"], compare={"dflash": "runs/dflash"}),
                  compare={"dflash": dict(dflash)})
    card = render_model_card(config, {"verification_policy": "full"}, [result])
    row = next(line for line in card.splitlines() if line.startswith("| ↳ gsm8k, `dflash` |"))
    assert "| 12 | 2.31 | 1.40× | 30.2 |" in row and "0.80 / 0.40 / 0.10" in row
    assert "`dflash` = `runs/dflash`" in card
    assert "gsm8k vs `dflash`: 1.24 (90% CI 1.05–1.40)" in card
    assert "↳" not in render_model_card(config, {"verification_policy": "full"}, [EVAL])
    # only per-dataset compare rows: the macro-level "compare" entry is not a dataset
    assert card.count("| ↳ ") == 1



def test_card_shows_speedups_against_the_best_plain_run(exported):
    """Under sampling the fused-warper plain run can beat plain `generate` as called: the card's speed-ups are
    against the faster of the two, prompt lookup's beside DSpark's, and never against the slower baseline."""
    from hf_dspark.checkpoints.model_card import render_model_card

    _, target, _ = exported
    config = tiny_drafter(target, target_model_name=TARGET_NAME).config
    alone = {"mean_accepted_length": 1.5, "tokens_per_second": 12.0, "speedup": 1.2, "speedup_vs_best_plain": 1.06}
    gsm8k = {"num_prompts": 8, "mean_accepted_length": 1.69, "tokens_per_second": 14.6,
             "baseline_tokens_per_second": 10.2, "baseline_fused_tokens_per_second": 11.3,
             "best_plain_tokens_per_second": 11.3, "speedup": 1.43, "speedup_vs_best_plain": 1.29,
             "prompt_lookup_speedup": 0.53, "prompt_lookup_speedup_vs_best_plain": 0.47,
             "compare": {"drafter_alone": alone}}
    sampling = {"settings": dict(EVAL["settings"], temperature=1.0, top_k=64, top_p=0.95), "gsm8k": gsm8k,
                "speedup": 1.43, "speedup_vs_best_plain": 1.29}
    card = render_model_card(config, {"verification_policy": "full"}, [sampling])
    header = next(line for line in card.splitlines() if line.startswith("| Dataset |"))
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    assert titles[3:7] == ["Speed-up vs best plain `generate`", "Prompt lookup, vs best plain", "Tokens/s (DSpark)",
                           "Tokens/s (best plain)"]
    assert "| gsm8k | 8 | 1.69 | 1.29× | 0.47× | 14.6 | 11.3 |" in card
    assert "| ↳ gsm8k, `drafter_alone` | 8 | 1.50 | 1.06× | — | 12.0 |" in card
    assert "1.43×" not in card and "0.53×" not in card and "1.20×" not in card and "10.2" not in card
    assert "whichever was faster" in card and "Prompt lookup is transformers'" in card
    # a fused-warper run without the figures against it: no speed-up shown rather than one against plain as called
    unranked_gsm8k = {k: v for k, v in gsm8k.items() if "best_plain" not in k and k != "compare"}
    unranked = dict(sampling, gsm8k=unranked_gsm8k, mt_bench=dict(unranked_gsm8k, speedup=1.5), mean_accepted_length=1.7)
    unranked.pop("speedup_vs_best_plain")
    unranked_card = render_model_card(config, {"verification_policy": "full"}, [unranked])
    assert "| **macro average** |" in unranked_card
    assert "1.43×" not in unranked_card and "1.50×" not in unranked_card and "Speed-up vs best plain" not in unranked_card
    # an older file that timed plain `generate` only: its speed-up against plain is the one against the best plain
    assert "| gsm8k | 12 | 2.87 | 1.93× | 41.5 | 21.5 |" in render_model_card(config, {"verification_policy": "full"}, [EVAL])


def test_shipped_card_is_rendered_from_its_inputs():
    """hf_dspark/assets/gemma-3-270m-dspark/README.md is what the renderer makes of the drafter's config, generation
    config and dspark_card.json (re-render it as this test does after changing the template or the renderer)."""
    from hf_dspark.checkpoints.model_card import render_model_card
    from hf_dspark.models.dspark.configuration_dspark import DSparkConfig

    folder = REPO_ROOT / "hf_dspark" / "assets" / "gemma-3-270m-dspark"
    inputs = json.loads((folder / "dspark_card.json").read_text())
    card = render_model_card(DSparkConfig.from_pretrained(folder),
                             json.loads((folder / "generation_config.json").read_text()),
                             inputs.get("eval_results", []), recipe=inputs.get("recipe"), license=inputs.get("license"),
                             serving=inputs.get("serving", []))
    assert (folder / "README.md").read_text() == card, f"{folder}/README.md is stale: re-render it from dspark_card.json"
    sampling_gsm8k = inputs["eval_results"][1]["gsm8k"]
    assert f"| {sampling_gsm8k['speedup_vs_best_plain']:.2f}× | {sampling_gsm8k['prompt_lookup_speedup_vs_best_plain']:.2f}× |" in card

BENCH_BATCH = {"settings": {"dtype": "float32", "device": "cpu", "threads": 1, "num_prompts": 4, "max_new_tokens": 16,
                            "do_sample": False, "ngram_lookup_tokens": 7},
               "results": [{"concurrency": c, "method": m, "tokens_per_second": tps,
                            "throughput_ratio_vs_plain": ratio, "greedy_agreement_with_plain": 1.0}
                           for c, m, tps, ratio in [(1, "plain", 8.25, 1.0), (1, "async", 14.6, 1.77),
                                                    (8, "plain", 20.14, 1.0), (8, "async", 31.0, 1.539),
                                                    (8, "scheduler", 27.2, 1.35)]]}
BENCH_SERVE = {"settings": {"dtype": "float32", "threads": 1, "num_requests": 6, "min_new_tokens": 4, "max_new_tokens": 8,
                            "max_concurrency": 4, "prompts": ["/data/eval/gsm8k.jsonl"]},
               "results": [{"rate": rate, "mode": mode, "requests": 6, "tokens_per_second": tps, "tpot_p50": tpot,
                            "tpot_p90": 2 * tpot, "outputs_equal_alone": 6}
                           for rate, mode, tps, tpot in [("inf", "plain", 23.7, 0.452), ("inf", "async", 28.9, 0.417),
                                                         (0.48, "plain", 14.8, 0.251), (0.48, "async", 16.2, 0.128)]]}


def test_card_shows_batched_serving_results_and_export_records_them(exported, tmp_path):
    from hf_dspark.checkpoints.model_card import load_serving_results

    root, _, out = exported
    assert "Batched serving" not in (out / "README.md").read_text()  # nothing attached: no section
    files = []
    for name, data in (("batch.json", BENCH_BATCH), ("serve.json", BENCH_SERVE)):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(data))
    again = export_drafter(out, root / "hub_serving", serving_json=files)
    card = (again / "README.md").read_text()
    assert "## Batched serving" in card and card.index("## Batched serving") < card.index("## Training")
    assert "| 8 | 20.1 | 1.35× | 1.54× |" in card  # plain tok/s, then algorithm1 and async against it
    assert "| 1 | 8.2 | — | 1.77× |" in card
    assert "Every output equals plain batched `generate`: yes." in card
    rows = [line for line in card.splitlines() if line.startswith("| 0.48 req/s") or line.startswith("| all at once")]
    assert rows == ["| 0.48 req/s | 14.8, 251 ms | 16.2, 128 ms |", "| all at once | 23.7, 452 ms | 28.9, 417 ms |"]
    assert "prompts gsm8k.jsonl" in card and "at every rate: yes." in card
    recorded = json.loads((again / "dspark_card.json").read_text())["serving"]
    assert recorded == load_serving_results(files)
    kept = export_drafter(again, root / "hub_serving_again")  # recorded inputs come back on re-export
    assert (kept / "README.md").read_text() == card
    assert "at the same concurrency." in card and "LM-head layout" not in card  # a file without plain_head
    fast = tmp_path / "batch_fast.json"
    fast.write_text(json.dumps({**BENCH_BATCH, "settings": {**BENCH_BATCH["settings"], "plain_head": "fast"}}))
    with_layout = export_drafter(out, root / "hub_serving_fast", serving_json=[fast])
    assert "(given the engine's exact LM-head layout for 2-8 rows)." in (with_layout / "README.md").read_text()
    broken = tmp_path / "eval.json"
    broken.write_text(json.dumps(EVAL))
    with pytest.raises(ValueError, match=r"--serving-json .*eval.json.*bench-batch"):
        load_serving_results([broken])


# ----------------------------------------------------------------------------- refusals
def test_refuses_drafter_without_target_name(tmp_path):
    target = tiny_qwen3_target()
    draft = tiny_drafter(target)
    draft.config.target_model_name = None
    draft.save_pretrained(tmp_path / "draft")
    with pytest.raises(CheckpointError, match="target_model_name is not set"):
        export_drafter(tmp_path / "draft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_refuses_weights_that_do_not_match_config(tmp_path, damage):
    folder = _save_drafter(tmp_path / "draft", tiny_qwen3_target())
    weights = load_file(folder / "model.safetensors")
    if damage == "extra":
        weights["markov_head.gate_proj.weight"] = torch.zeros(8, 40)
    elif damage == "missing":
        del weights["confidence_head.proj.weight"]
    else:
        weights["fc.weight"] = torch.zeros(32, 96)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="do not match"):
        export_drafter(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_folder_without_config(tmp_path, capsys):
    from hf_dspark.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        export_drafter(tmp_path / "empty", tmp_path / "out")
    assert main(["export", "--draft", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- engine formats
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_engine_export_full_vocab(tmp_path, engine):
    target = tiny_qwen3_target()
    folder = _save_drafter(tmp_path / "draft", target, context_input_norm=False)
    out = export_drafter(folder, tmp_path / engine, format=engine)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    for key, value in {"block_size": 5, "target_layer_ids": [0, 2], "num_target_layers": 4, "markov_rank": 8,
                       "markov_head_type": "vanilla", "enable_confidence_head": True,
                       "confidence_head_with_markov": True, "mask_token_id": 0, "target_hidden_size": 32,
                       "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16,
                       "layer_types": ["full_attention"], "target_model_name": TARGET_NAME}.items():
        assert config[key] == value, key
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]
    assert "auto_map" not in config and "draft_vocab_size" not in config
    if engine == "vllm":
        assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3]
    else:
        assert "eagle_aux_hidden_state_layer_ids" not in config
    stored, original = _tensors(out), load_file(folder / "model.safetensors")
    assert sorted(stored) == sorted(original)
    assert all(torch.equal(stored[k], original[k]) for k in stored)
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.base_model == TARGET_NAME
    assert upload_plan(out)  # engine folders are pushable too


def test_vllm_reduced_vocab_uses_eagle3_offsets_and_target_rows(tmp_path):
    target = tiny_qwen3_target()
    target.save_pretrained(tmp_path / "target")
    vocab_ids = [0, 1, 2] + list(range(10, 90, 2))
    folder = _save_drafter(tmp_path / "draft", target, draft_vocab_size=len(vocab_ids), draft_token_ids=vocab_ids, context_input_norm=False)
    with pytest.raises(DSparkConfigError, match="--target"):
        export_drafter(folder, tmp_path / "no_target", format="vllm")
    out = export_drafter(folder, tmp_path / "vllm", format="vllm", target=tmp_path / "target")
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == len(vocab_ids) and config["vocab_size"] == 96
    t = _tensors(out)
    d2t = torch.tensor(vocab_ids)
    assert t["d2t"].dtype == torch.int64
    assert torch.equal(t["d2t"] + torch.arange(len(vocab_ids)), d2t)  # offsets: target id - draft id
    assert t["t2d"].dtype == torch.bool and t["t2d"].sum() == len(vocab_ids) and bool(t["t2d"][d2t].all())
    assert torch.equal(t["lm_head.weight"], target.lm_head.weight.detach()[d2t])
    assert t["markov_head.markov_w1.weight"].shape == (96, 8) and t["markov_head.markov_w2.weight"].shape[0] == len(vocab_ids)

    # vLLM's Markov bias for a previous TARGET token equals hf-dspark's (zero outside the draft vocabulary).
    from hf_dspark import DSparkDraftModel

    draft = DSparkDraftModel.from_pretrained(folder)
    head = draft.markov_head
    prev = torch.tensor([0, 5, 10, 11, 88, 89])
    ours = head.step(None, draft.previous_token_embedding(prev), None)[0]
    theirs = t["markov_head.markov_w1.weight"][prev] @ t["markov_head.markov_w2.weight"].T
    torch.testing.assert_close(theirs, ours)


def test_sglang_reduced_vocab_needs_explicit_expansion(tmp_path):
    target = tiny_qwen3_target()
    vocab_ids = list(range(0, 96, 3))
    folder = _save_drafter(tmp_path / "draft", target, draft_vocab_size=len(vocab_ids), draft_token_ids=vocab_ids, context_input_norm=False)
    with pytest.raises(DSparkConfigError, match="--expand-draft-vocab"):
        export_drafter(folder, tmp_path / "sglang", format="sglang")
    assert not (tmp_path / "sglang").exists()
    out = export_drafter(folder, tmp_path / "sglang", format="sglang", expand_draft_vocab=True)
    t = _tensors(out)
    assert "d2t" not in t and "draft_vocab_size" not in json.loads((out / "config.json").read_text())
    w1, w2 = t["markov_head.markov_w1.weight"], t["markov_head.markov_w2.weight"]
    assert w1.shape == (96, 8) and w2.shape == (96, 8)
    outside = torch.ones(96, dtype=torch.bool)
    outside[vocab_ids] = False
    assert not w1[outside].any() and not w2[outside].any()
    original = load_file(folder / "model.safetensors")
    assert torch.equal(w2[vocab_ids], original["markov_head.markov_w2.weight"])


def test_gated_head_is_sglang_only(tmp_path):
    folder = _save_drafter(tmp_path / "draft", tiny_qwen3_target(), markov_head_type="gated", context_input_norm=False)
    with pytest.raises(DSparkConfigError, match="vanilla"):
        export_drafter(folder, tmp_path / "vllm", format="vllm")
    out = export_drafter(folder, tmp_path / "sglang", format="sglang")
    assert "markov_head.gate_proj.weight" in _tensors(out)


def test_sglang_rnn_head_is_copied_and_matches_sglangs_cell(tmp_path):
    """SGLang's RNN cell (like DeepSpec's and ours) keeps sigmoid(gate)*state + (1-sigmoid(gate))*tanh(candidate):
    the export copies joint_proj unchanged, and a cell written from that formula over the exported
    tensors agrees with hf-dspark's head step by step."""
    target = tiny_qwen3_target()
    folder = _save_drafter(tmp_path / "draft", target, markov_head_type="rnn", context_input_norm=False)
    out = export_drafter(folder, tmp_path / "sglang", format="sglang")
    t = _tensors(out)
    from hf_dspark import DSparkDraftModel

    draft = DSparkDraftModel.from_pretrained(folder)
    head, rank = draft.markov_head, draft.config.markov_rank
    weight, bias = t["markov_head.joint_proj.weight"], t["markov_head.joint_proj.bias"]
    original = load_file(folder / "model.safetensors")
    assert torch.equal(weight, original["markov_head.joint_proj.weight"])
    assert torch.equal(bias, original["markov_head.joint_proj.bias"])
    w1, w2 = t["markov_head.markov_w1.weight"], t["markov_head.markov_w2.weight"]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 4, 32, generator=gen)
    prev = torch.randint(0, 96, (3, 4), generator=gen)
    ours_state = theirs_state = None
    for k in range(4):
        ours, ours_state = head.step(hidden[:, k], head.embed_previous(prev[:, k]), ours_state)
        emb = w1[prev[:, k]]
        state = torch.zeros_like(emb) if theirs_state is None else theirs_state
        gate_raw, cand_raw, out_raw = (torch.cat([state, emb, hidden[:, k]], -1) @ weight.T + bias).chunk(3, -1)
        gate = torch.sigmoid(gate_raw)
        theirs_state = gate * state + (1 - gate) * torch.tanh(cand_raw)
        theirs = torch.tanh(out_raw) @ w2.T
        torch.testing.assert_close(theirs, ours)
    with pytest.raises(DSparkConfigError, match="vanilla"):
        export_drafter(folder, tmp_path / "vllm", format="vllm")


def test_engine_refuses_dflash_and_embedding_layer(tmp_path):
    target = tiny_qwen3_target()
    folder = _save_drafter(tmp_path / "dflash", target, markov_rank=0, confidence_head_with_markov=False, context_input_norm=False)
    with pytest.raises(DSparkConfigError, match="markov_rank"):
        export_drafter(folder, tmp_path / "out", format="vllm")
    folder = _save_drafter(tmp_path / "emb", target, target_layer_ids=[-1, 2], context_input_norm=False)
    with pytest.raises(DSparkConfigError, match="target_layer_ids"):
        export_drafter(folder, tmp_path / "out", format="sglang")


# ----------------------------------------------------------------------------- push
class _NoNetwork:
    def __init__(self, *args, **kwargs):
        raise AssertionError("HfApi must not be used by a dry run")


def test_push_dry_run_lists_files_without_network(exported, monkeypatch, capsys):
    import huggingface_hub

    from hf_dspark.cli import main

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoNetwork)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, out = exported
    (out / ".cache").mkdir(exist_ok=True)
    (out / ".cache" / "junk").write_text("x")
    assert main(["push", "--draft", str(out), "--repo", "me/tiny-DSpark", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "https://huggingface.co/me/tiny-DSpark" in printed and "public" in printed
    for name in ("README.md", "config.json", "model.safetensors", "modeling_dspark.py"):
        assert name in printed
    assert ".cache" not in printed
    size = (out / "model.safetensors").stat().st_size
    assert ("model.safetensors", size) in upload_plan(out)


def test_push_uploads_through_hfapi(exported, monkeypatch):
    import huggingface_hub

    from hf_dspark.checkpoints.export import push_drafter

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))
            return "https://huggingface.co/me/tiny-DSpark/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _, _, out = exported
    url = push_drafter(out, "me/tiny-DSpark", private=True, commit_message="first")
    assert url.endswith("/commit/abc")
    assert calls[0] == ("create_repo", "me/tiny-DSpark", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][2]["folder_path"] == str(out) and calls[1][2]["commit_message"] == "first"


def test_push_refuses_non_export_folder(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoNetwork)
    folder = _save_drafter(tmp_path / "draft", tiny_qwen3_target())  # trained drafter, not exported
    with pytest.raises(CheckpointError, match="not an exported drafter"):
        upload_plan(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\nhi\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "dspark"}))
    with pytest.raises(CheckpointError, match="not a hub export"):
        upload_plan(folder)
    with pytest.raises(ValueError, match="org_or_user/name"):
        from hf_dspark.checkpoints.export import push_drafter

        push_drafter(folder, "no-slash", dry_run=True)


# ----------------------------------------------------------------------------- example card
def test_example_card_in_repository_is_current():
    example = REPO_ROOT / "model_cards" / "dspark_drafter.md"
    assert example.read_text() == render_example_card(), (
        "model_cards/dspark_drafter.md is stale: python -m hf_dspark.checkpoints.model_card > model_cards/dspark_drafter.md"
    )
