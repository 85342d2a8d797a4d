"""`hf-dspark eval` and `hf-dspark demo` on tiny random models: result fields, resume, plots, datasets."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _fixtures import write_jsonl
from _models import briefly_trained_drafter, tiny_drafter
from _models import BOS_ID

import hf_dspark  # noqa: F401  (installs the generate hook)
from hf_dspark import DataError, evaluation
from hf_dspark.commands import eval as eval_command
from hf_dspark.cli import main
from hf_dspark.targets import GEMMA_ALIAS, DraftNotFoundError, load_target, resolve_draft

BLOCK_SIZE = 4
GSM8K_ROWS = [
    {"turns": ["what is two and three ? answer the question step by step"], "answer": "2 + 3 = 5\n#### 5"},
    {"turns": ["how many is the sum of three and three"], "answer": "#### 6"},
    {"turns": ["the number of a list of two"]},
]
CODE_ROWS = [
    {"turns": ["write python code to sum a list", "and now the final answer"]},
    {"turns": ["please write code : the list of number and the sum"]},
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_target_dir):
    """Prompt files plus two drafter folders (a briefly trained DSpark drafter, a DFlash-style one)."""
    root = tmp_path_factory.mktemp("eval")
    target, _ = load_target(str(tiny_target_dir))
    prompts = [torch.tensor([[BOS_ID] + list(range(6 + i, 12 + i))]) for i in range(3)]
    briefly_trained_drafter(target, prompts, steps=15, new_tokens=24, block_size=BLOCK_SIZE,
                            target_layer_ids=[0, 1]).save_pretrained(root / "draft")
    tiny_drafter(target, block_size=3, markov_rank=0, target_layer_ids=[0, 1]).save_pretrained(root / "dflash")
    return {
        "root": root,
        "target": str(tiny_target_dir),
        "gsm8k": write_jsonl(root / "gsm8k-mini.jsonl", GSM8K_ROWS),
        "code": write_jsonl(root / "code.jsonl", CODE_ROWS),
    }


def eval_args(ws, output, *extra):
    return ["eval", "--target", ws["target"], "--draft", str(ws["root"] / "draft"),
            "--prompts", str(ws["gsm8k"]), str(ws["code"]), "--max-new-tokens", "20",
            "--output", str(output), "--no-progress", *extra]


@pytest.fixture(scope="module")
def greedy_results(workspace):
    output = workspace["root"] / "greedy.json"
    args = eval_args(workspace, output, "--baseline", "--prompt-lookup", "--compare-draft",
                     str(workspace["root"] / "dflash"), "--compare-name", "dflash",
                     "--plots", str(workspace["root"] / "plots"))
    assert main(args) == 0
    return json.loads(output.read_text()), args, output


def test_eval_fields_are_present_and_consistent(greedy_results):
    results, _, _ = greedy_results
    assert set(results["datasets"]) == {"gsm8k-mini", "code"}
    settings = results["settings"]
    for key in ("target", "draft", "policy", "temperature", "top_k", "top_p", "max_new_tokens", "seed", "dtype",
                "torch_threads", "hardware", "torch", "transformers"):
        assert key in settings, key
    sets = list(results["datasets"].values())
    for entry in sets:
        assert entry["num_prompts"] == len(entry["prompts"])
        assert 1.0 <= entry["mean_accepted_length"] <= BLOCK_SIZE + 1
        acceptance = entry["per_position_acceptance"]
        assert len(acceptance) == BLOCK_SIZE
        # accepted / attempted at each draft position, over the set's records; every round tries position 1
        drafts = [r["dspark"] for r in entry["prompts"]]
        assert sum(d["position_attempted"][0] for d in drafts) == sum(d["rounds"] for d in drafts) > 0
        for k, value in enumerate(acceptance):
            tried = sum(d["position_attempted"][k] for d in drafts if k < len(d["position_attempted"]))
            hits = sum(d["position_accepted"][k] for d in drafts if k < len(d["position_accepted"]))
            assert value == (pytest.approx(hits / tried) if tried else None), k
        assert entry["speedup"] == pytest.approx(entry["tokens_per_second"] / entry["baseline_tokens_per_second"])
        # greedy: no fused plain run (no top-k / top-p), so the best plain setup is plain generate itself
        assert entry["baseline_fused_tokens_per_second"] is None
        assert entry["speedup_vs_best_plain"] == pytest.approx(entry["speedup"])
        assert entry["outputs_match_baseline"] is True
        assert entry["prompt_lookup_speedup"] == pytest.approx(
            entry["prompt_lookup_tokens_per_second"] / entry["baseline_tokens_per_second"])
        assert entry["prompt_lookup_outputs_match_baseline"] is True
        dflash = entry["compare"]["dflash"]
        assert len(dflash["per_position_acceptance"]) == 3
        assert 1.0 <= dflash["mean_accepted_length"] <= 4
        assert dflash["outputs_match_baseline"] is True
        # tau is accepted tokens / rounds over the whole set
        records = entry["prompts"]
        accepted = sum(r["dspark"]["accepted_tokens"] for r in records)
        assert entry["mean_accepted_length"] == pytest.approx(accepted / sum(r["dspark"]["rounds"] for r in records))
        low, high = entry["mean_accepted_length_ci90"]
        assert low <= entry["mean_accepted_length"] <= high
        assert dflash["dspark_tau_ratio"] == pytest.approx(entry["mean_accepted_length"] / dflash["mean_accepted_length"])
        low, high = dflash["dspark_tau_ratio_ci90"]
        assert low <= dflash["dspark_tau_ratio"] <= high
    assert results["num_prompts"] == len(GSM8K_ROWS) + len(CODE_ROWS)
    assert results["mean_accepted_length"] == pytest.approx(sum(s["mean_accepted_length"] for s in sets) / 2)
    assert results["speedup"] == pytest.approx(sum(s["speedup"] for s in sets) / 2)
    assert results["outputs_match_baseline"] is True
    assert "dflash" in results["compare"]
    assert len(results["per_position_acceptance"]) == BLOCK_SIZE
    assert "mean_accepted_length_ci90" not in results  # intervals are per set, never averaged


def test_bootstrap_interval_over_prompts():
    def entry(accepted, rounds):
        return {"accepted_tokens": accepted, "rounds": rounds}

    tau = lambda es: sum(e["accepted_tokens"] for e in es) / sum(e["rounds"] for e in es)  # noqa: E731
    spread = [entry(10, 10), entry(40, 10), entry(20, 10), entry(30, 10)]  # per-prompt tau 1..4
    low, high = evaluation.bootstrap_ci(spread, tau)
    assert 1.0 <= low < tau(spread) < high <= 4.0
    assert evaluation.bootstrap_ci(spread, tau) == [low, high]  # seeded: reproducible
    assert evaluation.bootstrap_ci([entry(25, 10)] * 4, tau) == [2.5, 2.5]  # identical prompts: no spread
    wide = evaluation.bootstrap_ci(spread, tau, level=0.99)
    assert wide[0] <= low and wide[1] >= high
    many = evaluation.bootstrap_ci(spread * 25, tau)  # 100 prompts with the same spread: narrower
    assert many[1] - many[0] < (high - low) / 2
    assert evaluation.bootstrap_ci(spread[:1], tau) is None


def test_eval_gsm8k_quality_and_plots(greedy_results, workspace):
    results, _, _ = greedy_results
    quality = results["datasets"]["gsm8k-mini"]["quality"]
    assert quality["answers_match_baseline"] == 1.0  # greedy outputs are identical
    assert quality["num_with_reference"] == 2
    assert 0.0 <= quality["accuracy"] <= 1.0
    assert quality["metric_source"]  # evaluate's metric, or the local fallback and why
    assert [r["answers"]["reference"] for r in results["datasets"]["gsm8k-mini"]["prompts"]] == ["5", "6", None]
    assert "quality" not in results["datasets"]["code"]
    for name in ("acceptance_per_position.png", "tau_per_dataset.png", "speedup_per_dataset.png"):
        path = workspace["root"] / "plots" / name
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_eval_resumes_and_refuses_other_settings(greedy_results, monkeypatch, capsys):
    results, args, output = greedy_results

    def fail(*a, **k):
        raise AssertionError("a finished prompt was measured again")

    monkeypatch.setattr(eval_command, "measure_prompt", fail)
    monkeypatch.setattr(eval_command, "_warm_up", lambda *a, **k: None)
    assert main(args) == 0
    assert json.loads(output.read_text())["datasets"] == results["datasets"]
    assert main(args + ["--seed", "7"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err
    # a file written before the ngram_lookup_tokens setting existed resumes with the value it implies only
    older = json.loads(output.read_text())
    del older["settings"]["ngram_lookup_tokens"]
    output.write_text(json.dumps(older))
    assert main(args) == 0
    output.write_text(json.dumps(older))
    assert main(args + ["--ngram-lookup", "3"]) == 2
    assert "other settings (ngram_lookup_tokens)" in capsys.readouterr().err


def test_eval_sampling_without_baseline_and_policy(workspace):
    output = workspace["root"] / "sampled.json"
    args = eval_args(workspace, output, "--temperature", "0.8", "--top-p", "0.9", "--max-prompts", "1",
                     "--policy", "threshold")
    assert main(args) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["top_p"] == 0.9 and results["settings"]["top_k"] == 0
    assert results["num_prompts"] == 2
    for entry in results["datasets"].values():
        assert entry["policy"] == "threshold"
        assert "speedup" not in entry and "baseline_tokens_per_second" not in entry
        assert 0 < entry["new_tokens"] <= entry["num_prompts"] * results["settings"]["max_new_tokens"]
        assert entry["tokens_per_second"] == pytest.approx(entry["new_tokens"] / entry["seconds"])
    args[args.index("--max-prompts") + 1] = "2"
    assert main(args + ["--baseline"]) == 2  # other settings: refused, not mixed
    assert main(args + ["--baseline", "--overwrite"]) == 0
    for entry in json.loads(output.read_text())["datasets"].values():
        assert entry["outputs_match_baseline"] is None  # sampling: not comparable token for token
        assert entry["speedup"] == pytest.approx(entry["tokens_per_second"] / entry["baseline_tokens_per_second"])


def test_eval_cost_policy_profiles_target_and_second_draft_is_compared(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DSPARK_CACHE", str(tmp_path / "cache"))  # the latency profile goes here
    output = tmp_path / "cost.json"
    args = ["eval", "--target", workspace["target"], "--draft", str(workspace["root"] / "draft"),
            "--draft", str(workspace["root"] / "dflash"), "--prompts", str(workspace["code"]),
            "--max-new-tokens", "12", "--policy", "cost", "--baseline", "--output", str(output), "--no-progress"]
    assert main(args) == 0
    entry = json.loads(output.read_text())["datasets"]["code"]
    assert entry["policy"] == "cost" and entry["outputs_match_baseline"] is True
    assert any((tmp_path / "cache" / "latency").iterdir())
    assert entry["compare"]["dflash"]["outputs_match_baseline"] is True


def test_eval_ngram_lookup_applies_to_the_drafter_under_test_only(workspace, tmp_path):
    output = tmp_path / "ngram.json"
    args = ["eval", "--target", workspace["target"], "--draft", str(workspace["root"] / "draft"),
            "--compare-draft", str(workspace["root"] / "dflash"), "--prompts", str(workspace["gsm8k"]),
            "--max-new-tokens", "24", "--ngram-lookup", "6", "--baseline", "--output", str(output), "--no-progress"]
    assert main(args) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["ngram_lookup_tokens"] == 6
    entry = results["datasets"]["gsm8k-mini"]
    assert entry["outputs_match_baseline"] is True and entry["compare"]["dflash"]["outputs_match_baseline"] is True
    assert entry["ngram_rounds"] > 0  # the tiny target repeats itself, so n-gram rounds happen
    assert entry["ngram_accepted_tokens"] <= 6 * entry["ngram_rounds"]
    assert "ngram_rounds" not in entry["compare"]["dflash"]  # compare drafters keep their saved setting (off)
    assert entry["ngram_rounds"] == sum(r["dspark"]["ngram_rounds"] for r in entry["prompts"])
    assert main(args[:-4] + ["--ngram-lookup", "-1", "--output", str(tmp_path / "bad.json"), "--no-progress"]) == 2


def test_merge_eval_pools_shards_like_one_run(workspace, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "gsm8k-mini.jsonl", GSM8K_ROWS[:1])
    write_jsonl(tmp_path / "b" / "gsm8k-mini.jsonl", GSM8K_ROWS[1:])

    def run(prompts, output, *extra):
        args = ["eval", "--target", workspace["target"], "--draft", str(workspace["root"] / "draft"),
                "--compare-draft", str(workspace["root"] / "dflash"), "--prompts", str(prompts),
                "--max-new-tokens", "16", "--baseline", "--output", str(output), "--no-progress", *extra]
        assert main(args) == 0
        return json.loads(output.read_text())

    whole = run(workspace["gsm8k"], tmp_path / "whole.json")
    run(tmp_path / "a" / "gsm8k-mini.jsonl", tmp_path / "a.json")
    run(tmp_path / "b" / "gsm8k-mini.jsonl", tmp_path / "b.json", "--seed", "1")  # row i of the file: seed 1 + i
    assert main(["merge-eval", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--output", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    one, pooled = whole["datasets"]["gsm8k-mini"], merged["datasets"]["gsm8k-mini"]
    for key in ("num_prompts", "rounds", "accepted_tokens", "mean_accepted_length", "per_position_acceptance",
                "mean_accepted_length_ci90", "outputs_match_baseline"):
        assert pooled[key] == one[key], key
    assert pooled["compare"]["dflash"]["dspark_tau_ratio"] == one["compare"]["dflash"]["dspark_tau_ratio"]
    assert [r["seed"] for r in pooled["prompts"]] == [r["seed"] for r in one["prompts"]]
    assert merged["settings"]["seed"] == "per prompt (see records)"
    capsys.readouterr()
    assert main(["merge-eval", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--output",
                 str(tmp_path / "bad.json")]) == 2
    assert "more than one file" in capsys.readouterr().err
    run(tmp_path / "b" / "gsm8k-mini.jsonl", tmp_path / "c.json", "--max-new-tokens", "8")
    assert main(["merge-eval", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--output",
                 str(tmp_path / "bad.json")]) == 2
    assert "other settings (max_new_tokens)" in capsys.readouterr().err


def test_eval_encodes_prompts_as_the_drafter_was_trained(workspace, tiny_chat_target_dir, tmp_path):
    """A drafter trained on raw text gets raw prompts even when the target has a chat template."""
    import shutil

    from _models import build_tiny_tokenizer

    from hf_dspark.data import encode_prompt

    raw_draft = tmp_path / "raw_draft"
    shutil.copytree(workspace["root"] / "draft", raw_draft)
    config = json.loads((raw_draft / "config.json").read_text())
    (raw_draft / "config.json").write_text(json.dumps({**config, "prompt_chat_template": False}))
    tokenizer = build_tiny_tokenizer()
    text = CODE_ROWS[0]["turns"][0]
    raw = len(encode_prompt(tokenizer, text, False))

    def prompt_tokens(*extra):
        output = tmp_path / f"chat{len(extra)}.json"
        args = ["eval", "--target", str(tiny_chat_target_dir), "--draft", str(raw_draft), "--prompts",
                str(workspace["code"]), "--max-prompts", "1", "--max-new-tokens", "4", "--output", str(output),
                "--no-progress", *extra]
        assert main(args) == 0
        results = json.loads(output.read_text())
        return results["datasets"]["code"]["prompts"][0]["prompt_tokens"], results["settings"]["chat_template"]

    assert prompt_tokens() == (raw, "auto")
    chat, mode = prompt_tokens("--chat-template", "yes")
    assert mode == "yes" and chat > raw  # the template adds its role markers


def test_eval_reports_missing_inputs(workspace, capsys):
    assert main(["eval", "--target", workspace["target"], "--draft", str(workspace["root"] / "draft")]) == 2
    assert "--prompts" in capsys.readouterr().err
    default = ["eval", "--target", workspace["target"], "--draft", "default", "--prompts", str(workspace["code"])]
    assert main(default) == 2
    assert "ships a default drafter only for" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pure helpers
def test_dataset_rows_convert():
    gsm = evaluation.gsm8k_row({"question": "Tom has 3 apples.", "answer": "3 + 0 = 3\n#### 3"})
    assert gsm["turns"][0].startswith("Tom has 3 apples.") and "\\boxed{}" in gsm["turns"][0]
    assert gsm["answer"].endswith("#### 3") and len(gsm["id"]) == 16
    assert evaluation.math500_row({"problem": "Find x.", "answer": "\\frac{1}{2}"})["answer"] == "\\frac{1}{2}"
    code = evaluation.humaneval_row({"prompt": "def f(x):\n    \"\"\"Double x.\"\"\"\n", "task_id": "HumanEval/0"})
    assert "```python\ndef f(x):" in code["turns"][0] and code["turns"][0].endswith("```")
    mbpp = evaluation.mbpp_row({"text": "Write a function to add.", "test_list": ["assert add(1, 2) == 3"]})
    assert mbpp["turns"] == ["Write a function to add.\nYour code should pass these tests:\nassert add(1, 2) == 3"]
    turns = ["First turn.", "Second turn."]
    assert evaluation.mt_bench_row({"prompt": turns})["turns"] == turns
    alpaca = evaluation.alpaca_row({"instruction": "Translate.", "input": "Bonjour"})
    assert alpaca["turns"] == ["Translate.\n\nBonjour"]
    assert evaluation.alpaca_row({"instruction": "Say hi.", "input": ""})["turns"] == ["Say hi."]
    assert evaluation.alpaca_row({"instruction": " ", "input": "x"}) is None
    assert evaluation.gsm8k_row({"question": ""}) is None
    assert set(evaluation.DATASETS) == {"gsm8k", "math500", "humaneval", "mbpp", "mt-bench", "alpaca"}


def test_offline_dataset_gives_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"openai/gsm8k.*Offline\?.*--prompts gsm8k\.jsonl"):
        evaluation.load_dataset_prompts("gsm8k")
    with pytest.raises(DataError, match="Unknown --dataset"):
        evaluation.load_dataset_prompts("nope")


@pytest.mark.parametrize("text, expected", [
    ("so she has 12 left. The answer is \\boxed{18}.", "18"),
    ("\\boxed{\\frac{1}{2}} and 3", "1"),
    ("Natalia sold 48/2 = 24 clips.\n#### 1,072", "1072"),
    ("The answer is $18.00, since 3 + 15 = 18.", "18"),
    ("First 5, then 7.50", "7.5"),
    ("no digits here", None),
    ("", None),
    ("It is -0.0", "0"),
])
def test_extract_final_number(text, expected):
    assert evaluation.extract_final_number(text) == expected


def test_macro_average_and_speedup_per_set():
    records = [
        {"index": 0, "id": "a", "baseline": {"new_tokens": 10, "seconds": 1.0},
         "dspark": {"new_tokens": 10, "seconds": 0.5, "rounds": 4, "accepted_tokens": 10,
                    "position_attempted": [4, 3], "position_accepted": [3, 0], "matches_baseline": True}},
        {"index": 1, "id": "b", "baseline": {"new_tokens": 10, "seconds": 1.0},
         "dspark": {"new_tokens": 10, "seconds": 1.5, "rounds": 6, "accepted_tokens": 10,
                    "position_attempted": [6, 0], "position_accepted": [0, 0], "matches_baseline": True}},
    ]
    summary = evaluation.summarize_prompt_set(records)
    assert summary["mean_accepted_length"] == pytest.approx(20 / 10)
    assert summary["per_position_acceptance"] == [pytest.approx(0.3), 0.0]
    assert summary["tokens_per_second"] == pytest.approx(10.0) and summary["speedup"] == pytest.approx(1.0)
    other = dict(summary, speedup=3.0, per_position_acceptance=[0.5, None], outputs_match_baseline=None)
    top = evaluation.macro_average([summary, other])
    assert top["speedup"] == pytest.approx(2.0) and top["num_prompts"] == 4
    assert top["per_position_acceptance"] == [pytest.approx(0.4), 0.0]
    assert top["outputs_match_baseline"] is None
    assert not math.isnan(top["mean_accepted_length"])


def test_resolve_draft():
    assert resolve_draft("some/hub-drafter", GEMMA_ALIAS) == "some/hub-drafter"
    assert resolve_draft("/tmp/my-draft", "any/target") == "/tmp/my-draft"
    with pytest.raises(DraftNotFoundError, match="ships a default drafter only for"):
        resolve_draft("default", "any/target")
    from hf_dspark.targets import shipped_draft_dir

    if not (shipped_draft_dir(GEMMA_ALIAS) / "config.json").is_file():
        with pytest.raises(DraftNotFoundError, match="not shipped yet.*hf-dspark train"):
            resolve_draft(None, GEMMA_ALIAS)
    else:
        assert resolve_draft(None, GEMMA_ALIAS) == str(shipped_draft_dir(GEMMA_ALIAS))


def test_demo_tiny(capsys):
    assert main(["demo", "--tiny", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "all greedy outputs identical to plain generate" in out
    assert out.count("identical to plain generate: True") == 3
    assert "verification policy 'full'" in out
    assert "speed-up" in out and out.count("--- sampling, prompt") == 3


def test_demo_tiny_with_ngram_rounds(capsys):
    assert main(["demo", "--tiny", "--max-new-tokens", "40", "--ngram-lookup", "5"]) == 0
    out = capsys.readouterr().out
    assert "n-gram rounds on (5 tokens)" in out and "all greedy outputs identical to plain generate" in out
    copied = int(out.split("  greedy: ")[1].split(" of ")[0])
    assert copied > 0  # the byte-level random target repeats itself, so some rounds copy
    assert main(["demo", "--tiny", "--ngram-lookup", "-1"]) == 2


def test_demo_tiny_cost_policy_profiles_and_stays_identical(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DSPARK_CACHE", str(tmp_path))
    assert main(["demo", "--tiny", "--max-new-tokens", "12", "--policy", "cost"]) == 0
    out = capsys.readouterr().out
    assert "verification policy 'cost'" in out and "profiling the target's verification latency" in out
    assert out.count("identical to plain generate: True") == 3
    assert list((tmp_path / "latency").glob("*.json")), "the latency profile was not cached"


def test_resume_drops_records_of_edited_rows(tmp_path):
    rows = [{"id": "aaaa", "turns": ["x"]}, {"id": "bbbb", "turns": ["y"]}]
    results = evaluation.EvalResults(None, {"seed": 0})
    results.records["set"] = [{"index": 0, "id": "aaaa"}, {"index": 1, "id": "old-text"}, {"index": 5, "id": "cccc"}]
    finished = results.finished(evaluation.PromptSet("set", rows, "set.jsonl"))
    assert finished == {(0, "aaaa"), (5, "cccc")}  # row 1 changed: measured again; row 5 is beyond --max-prompts


def test_eval_sampling_reports_the_fused_plain_baseline_and_the_best_plain_speedup(workspace):
    output = workspace["root"] / "fused.json"
    args = eval_args(workspace, output, "--temperature", "1", "--top-k", "20", "--top-p", "0.9", "--max-prompts", "2",
                     "--baseline")
    assert main(args) == 0
    results = json.loads(output.read_text())
    # The fused run samples the same distribution with the same seed, so it generates what plain generate
    # does: rerun both for each record and check the counts the record holds.
    from hf_dspark.data import encode_prompt

    target, tokenizer = load_target(workspace["target"])
    sampling = {"max_new_tokens": 20, "do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 0.9}
    rows = {"gsm8k-mini": GSM8K_ROWS, "code": CODE_ROWS}
    for name, entry in results["datasets"].items():
        for record in entry["prompts"]:
            input_ids = torch.tensor([encode_prompt(tokenizer, rows[name][record["index"]]["turns"][0], False)])
            assert input_ids.shape[1] == record["prompt_tokens"]
            plain_run = evaluation.measure_generate(target, input_ids, sampling, record["seed"])
            fused_run = evaluation.measure_generate(target, input_ids, evaluation.fused_plain_kwargs(sampling),
                                                    record["seed"])
            assert torch.equal(fused_run.output_ids, plain_run.output_ids), record["index"]
            assert record["baseline_fused"]["new_tokens"] == record["baseline"]["new_tokens"] == plain_run.new_tokens
        plain, fused = entry["baseline_tokens_per_second"], entry["baseline_fused_tokens_per_second"]
        assert fused == pytest.approx(sum(r["baseline_fused"]["new_tokens"] for r in entry["prompts"])
                                      / sum(r["baseline_fused"]["seconds"] for r in entry["prompts"]))
        assert entry["best_plain_tokens_per_second"] == max(plain, fused)
        assert entry["speedup_vs_best_plain"] == pytest.approx(entry["tokens_per_second"] / max(plain, fused))
        assert entry["speedup_vs_best_plain"] <= entry["speedup"] + 1e-12
    assert results["speedup_vs_best_plain"] == pytest.approx(
        sum(e["speedup_vs_best_plain"] for e in results["datasets"].values()) / len(results["datasets"]))


def test_fused_plain_kwargs_sample_the_same_distribution_as_the_pair():
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from hf_dspark.evaluation import fused_plain_kwargs

    assert fused_plain_kwargs({"do_sample": False, "max_new_tokens": 4}) is None
    assert fused_plain_kwargs({"do_sample": True, "top_k": 0, "top_p": 0.9}) is None  # nothing to fuse
    kwargs = fused_plain_kwargs({"do_sample": True, "temperature": 0.7, "top_k": 8, "top_p": 0.9, "max_new_tokens": 4})
    assert kwargs["top_k"] == 0 and kwargs["top_p"] == 1.0 and kwargs["temperature"] == 0.7
    (fused,) = kwargs["logits_processor"]
    scores = torch.randn(4, 300)
    pair = LogitsProcessorList([TopKLogitsWarper(8), TopPLogitsWarper(0.9)])
    assert torch.equal(fused(None, scores.clone()), pair(None, scores.clone()))


def test_demo_holds_greedy_outputs_to_their_dtype_contract():
    from _models import tiny_qwen3_target

    from hf_dspark.commands.demo import greedy_meets_contract

    target = tiny_qwen3_target()
    prompt = torch.tensor([[5, 9, 11, 3]])
    plain = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    assert greedy_meets_contract(target, 4, plain, plain.clone()) == (True, "")
    with torch.no_grad():  # the runner-up token at the first new position: far from a tie in a random model
        logits = target(prompt).logits[0, -1]
    other = plain.clone()
    other[0, 4] = int(torch.topk(logits, 2).indices[1])
    assert greedy_meets_contract(target, 4, plain, other) == (False, "")  # fp32: any difference fails
    half = copy.deepcopy(target).to(torch.bfloat16)
    ok, note = greedy_meets_contract(half, 4, plain, other)  # bf16: the logits are 25 rounding steps apart there
    assert not ok and "NOT a near-tie" in note and "bfloat16 contract" in note, note
