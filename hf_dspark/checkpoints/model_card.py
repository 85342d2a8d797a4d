"""Model cards for exported drafters.

The card text lives in one place, ``hf_dspark/assets/model_card_template.md`` (shipped as package
data); :func:`render_model_card` fills it from the drafter's config, its decoding settings, the
training recipe and any number of evaluation JSONs written by ``hf-dspark eval``.
``model_cards/dspark_drafter.md`` at the repository root is a rendered example, regenerated with
``python -m hf_dspark.checkpoints.model_card > model_cards/dspark_drafter.md`` (a test keeps it in sync).

Evaluation JSON shape (every key optional, unknown keys ignored)::

    {"settings": {"target", "draft", "policy", "temperature", "top_k", "top_p",
                  "max_new_tokens", "hardware", ...},
     "<dataset>": {"num_prompts", "mean_accepted_length", "per_position_acceptance",
                   "tokens_per_second", "baseline_tokens_per_second", "baseline_fused_tokens_per_second",
                   "best_plain_tokens_per_second", "speedup", "speedup_vs_best_plain",
                   "outputs_match_baseline", "prompt_lookup_speedup",
                   "prompt_lookup_speedup_vs_best_plain", ...},
     ...,
     "<metric>": <macro average over datasets>, ...}
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "assets" / "model_card_template.md"
CARD_TAGS = ("speculative-decoding", "dspark", "draft-model", "hf-dspark")
DEFAULT_LICENSE = "apache-2.0"

# (eval JSON key, column title, formatter); a column appears when any row has a value. Speed-ups are
# against the best plain run (see _against_best_plain), prompt lookup's beside DSpark's.
_METRIC_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("num_prompts", "Prompts", lambda v: f"{int(v)}"),
    ("mean_accepted_length", "τ (mean accepted length)", lambda v: f"{float(v):.2f}"),
    ("speedup_vs_best_plain", "Speed-up vs best plain `generate`", lambda v: f"{float(v):.2f}×"),
    ("prompt_lookup_speedup_vs_best_plain", "Prompt lookup, vs best plain", lambda v: f"{float(v):.2f}×"),
    ("tokens_per_second", "Tokens/s (DSpark)", lambda v: f"{float(v):.1f}"),
    ("best_plain_tokens_per_second", "Tokens/s (best plain)", lambda v: f"{float(v):.1f}"),
    ("outputs_match_baseline", "Outputs match target", lambda v: "yes" if v else "**no**"),
    ("per_position_acceptance", "Per-position acceptance", lambda v: " / ".join("n/a" if x is None else f"{float(x):.2f}" for x in v)),
)
_SETTINGS = (
    ("hardware", "hardware"),
    ("policy", "verification policy"),
    ("ngram_lookup_tokens", "n-gram lookup tokens"),
    ("temperature", "temperature"),
    ("top_k", "top-k"),
    ("top_p", "top-p"),
    ("max_new_tokens", "max new tokens"),
    ("dtype", "dtype"),
    ("target", "target"),
    ("draft", "drafter"),
)


# ----------------------------------------------------------------------------- inputs
def _read_json(path, option: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{option} {path}: cannot read it as JSON ({exc})") from exc


def load_eval_results(paths: Iterable[str | Path] | None) -> list[dict]:
    """Read evaluation JSON files; raise ``ValueError`` naming the file when one is unusable."""
    results = []
    for path in paths or ():
        data = _read_json(path, "--eval-json")
        if not isinstance(data, dict):
            raise ValueError(f"--eval-json {path}: expected a JSON object as written by `hf-dspark eval`")
        results.append(data)
    return results


def load_serving_results(paths: Iterable[str | Path] | None) -> list[dict]:
    """Summaries of ``hf-dspark bench-batch`` / ``bench-serve`` JSON files for the card's serving
    section (the card records these, not the whole files); raise ``ValueError`` naming a file that
    is neither."""
    summaries = []
    for path in paths or ():
        data = _read_json(path, "--serving-json")
        results = data.get("results") if isinstance(data, dict) else None
        settings = data.get("settings") if isinstance(data, dict) and isinstance(data.get("settings"), dict) else {}
        if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
            raise ValueError(f"--serving-json {path}: expected a JSON object with a 'results' list, as written by "
                             "`hf-dspark bench-batch` or `hf-dspark bench-serve`")
        keep = {k: settings[k] for k in ("dtype", "device", "threads", "max_new_tokens", "min_new_tokens", "num_prompts",
                                         "num_requests", "max_concurrency", "do_sample", "temperature", "top_k",
                                         "top_p", "ngram_lookup_tokens", "plain_head") if k in settings}
        keep["prompts"] = [Path(str(p)).name for p in settings.get("prompts") or ()]
        if all("concurrency" in r and "method" in r for r in results):
            rows = {}
            for r in results:
                row = rows.setdefault(int(r["concurrency"]), {"concurrency": int(r["concurrency"]), "ratios": {}})
                if r["method"] == "plain":
                    row["plain_tokens_per_second"] = r.get("tokens_per_second")
                else:
                    row["ratios"][r["method"]] = r.get("throughput_ratio_vs_plain")
            exact = all(r.get("greedy_agreement_with_plain", 1.0) == 1.0 for r in results)
            summaries.append({"kind": "bench-batch", "settings": keep, "rows": [rows[c] for c in sorted(rows)],
                              "outputs_equal_plain": exact if not settings.get("do_sample") else None})
        elif all("rate" in r and "mode" in r for r in results):
            rows = {}
            for r in results:
                row = rows.setdefault(str(r["rate"]), {"rate": r["rate"], "modes": {}})
                row["modes"][r["mode"]] = {k: r.get(k) for k in ("tokens_per_second", "tpot_p50", "tpot_p90")}
            equal = [(r.get("outputs_equal_alone"), r.get("requests")) for r in results]
            ordered = sorted(rows.values(), key=lambda row: float(row["rate"]))  # "inf" (all at once) last
            summaries.append({"kind": "bench-serve", "settings": keep, "rows": ordered,
                              "outputs_equal_alone": all(e == n for e, n in equal)
                              if all(isinstance(e, int) for e, _ in equal) else None})
        else:
            raise ValueError(f"--serving-json {path}: its results are neither bench-batch rows (concurrency, method) "
                             "nor bench-serve rows (rate, mode)")
    return summaries


def _dataset_rows(result: Mapping) -> list[tuple[str, Mapping]]:
    skip = {"settings", "datasets", "compare", "quality"}  # containers and macro-level extras, not datasets
    return [(name, value) for name, value in result.items() if name not in skip and isinstance(value, Mapping)]


def _compare_rows(row: Mapping) -> list[tuple[str, Mapping]]:
    """The ``compare`` drafters of one dataset row (``hf-dspark eval --compare-draft``), in file order."""
    compare = row.get("compare")
    if not isinstance(compare, Mapping):
        return []
    return [(str(name), entry) for name, entry in compare.items() if isinstance(entry, Mapping)]


def _has(value) -> bool:
    return value is not None and not (isinstance(value, (list, tuple)) and not value)


# (figure against the best plain run, the same figure against plain `generate` as called)
_BEST_PLAIN_KEYS = (("speedup_vs_best_plain", "speedup"),
                    ("prompt_lookup_speedup_vs_best_plain", "prompt_lookup_speedup"),
                    ("best_plain_tokens_per_second", "baseline_tokens_per_second"))


def _against_best_plain(row: Mapping, fused_baseline=None) -> dict:
    """``row`` with its speed-ups against the best plain run: plain ``generate`` as called and, where the run
    also timed it (sampling with top-k/top-p), plain ``generate`` with the fused warper, whichever was faster.

    ``hf-dspark eval`` writes those figures (``speedup_vs_best_plain`` ...). A file without them that never
    timed the fused-warper run (``baseline_fused_tokens_per_second`` absent or null, in the row and in
    ``fused_baseline``: the dataset's value for a compare row, any dataset's for the macro average) had plain
    ``generate`` as its only plain run,
    so its figures against plain are the figures against the best plain run. A file that timed the fused
    run but lacks the figures gets none, rather than a speed-up against a slower baseline."""
    row = dict(row)
    fused = row.get("baseline_fused_tokens_per_second")
    fused = fused if _has(fused) else fused_baseline
    for best, as_called in _BEST_PLAIN_KEYS:
        if not _has(row.get(best)) and not _has(fused) and _has(row.get(as_called)):
            row[best] = row[as_called]
    return row


# ----------------------------------------------------------------------------- sections
def _results_section(eval_results: Sequence[Mapping]) -> str:
    if not eval_results:
        return (
            "No measurements were attached when this card was written. Measure with "
            "`hf-dspark eval` and re-export with `--eval-json` to fill this section."
        )
    blocks = []
    for index, result in enumerate(eval_results):
        rows = [(name, _against_best_plain(row)) for name, row in _dataset_rows(result)]
        fused = [r.get("baseline_fused_tokens_per_second") for _, r in rows if _has(r.get("baseline_fused_tokens_per_second"))]
        averages = _against_best_plain(result, fused[0] if fused else None)
        macro = {key: averages.get(key) for key, _, _ in _METRIC_COLUMNS}
        if any(_has(v) for v in macro.values()) and len(rows) != 1:
            rows.append(("**macro average**", macro))
        columns = [c for c in _METRIC_COLUMNS if any(_has(r.get(c[0])) for _, r in rows)]
        settings = result.get("settings") if isinstance(result.get("settings"), Mapping) else {}
        described = [f"{label} `{settings[key]}`" for key, label in _SETTINGS if _has(settings.get(key))]
        lines = []
        if len(eval_results) > 1:
            lines.append(f"**Run {index + 1}.**")
        if described:
            lines.append("Settings: " + ", ".join(described) + ".")
        if rows and columns:
            lines.append("")
            lines.append("| Dataset | " + " | ".join(title for _, title, _ in columns) + " |")
            lines.append("|---|" + "---:|" * len(columns))
            def table_row(label: str, values: Mapping) -> str:
                cells = [fmt(values[key]) if _has(values.get(key)) else "—" for key, _, fmt in columns]
                return f"| {label} | " + " | ".join(cells) + " |"

            ratios = []
            for name, row in rows:
                lines.append(table_row(name, row))
                for other, entry in _compare_rows(row):
                    entry = _against_best_plain({"num_prompts": row.get("num_prompts"), **entry},
                                                row.get("baseline_fused_tokens_per_second"))
                    lines.append(table_row(f"↳ {name}, `{other}`", entry))
                    if _has(entry.get("dspark_tau_ratio")):
                        ci = entry.get("dspark_tau_ratio_ci90")
                        ci_text = f" (90% CI {ci[0]:.2f}–{ci[1]:.2f})" if _has(ci) and len(ci) == 2 else ""
                        ratios.append(f"{name} vs `{other}`: {float(entry['dspark_tau_ratio']):.2f}{ci_text}")
            sources = settings.get("compare") if isinstance(settings.get("compare"), Mapping) else {}
            if any(_compare_rows(row) for _, row in rows):
                named = ", ".join(f"`{n}` = `{src}`" for n, src in sources.items())
                lines.append("")
                lines.append("Rows marked ↳ are other drafters run side by side on the same prompts, each with its "
                             "own saved decoding settings" + (f" ({named})" if named else "") + ".")
                if ratios:
                    lines.append("τ of this drafter over theirs (paired bootstrap over prompts): "
                                 + "; ".join(ratios) + ".")
        else:
            lines.append("(The evaluation file holds no per-dataset metrics.)")
        blocks.append("\n".join(lines))
    footnote = (
        "τ counts the tokens committed per verification round, the target's bonus token included. "
        "Speed-ups are wall-clock ratios measured side by side in one run on the hardware named above, against "
        "the best plain run: plain `generate` as called and, where the run also timed it (sampling with top-k "
        "and top-p), plain `generate` with a fused top-k/top-p warper, whichever was faster."
    )
    if any(_has(r.get("prompt_lookup_speedup")) or _has(r.get("prompt_lookup_speedup_vs_best_plain"))
           for result in eval_results for _, r in [("", result), *_dataset_rows(result)]):
        footnote += " Prompt lookup is transformers' (`prompt_lookup_num_tokens`), timed in the same run."
    if any(isinstance(r.get("settings"), Mapping) and r["settings"].get("ngram_lookup_tokens") not in (None, 0, False)
           for r in eval_results):
        footnote += (" In runs with n-gram lookup tokens, τ covers every round, n-gram rounds included, and the "
                     "per-position acceptance covers the drafter's own rounds only.")
    return "\n\n".join(blocks + [footnote])


_SERVING_NAMES = {"plain_engine": "engine, no drafting", "full": "full block", "scheduler": "algorithm1",
                  "algorithm1": "algorithm1", "async": "async", "plain": "plain"}


def _serving_settings(settings: Mapping) -> str:
    parts = [f"{settings['dtype']}" if settings.get("dtype") else None,
             f"{settings['device']}" if settings.get("device") else None,
             (f"{settings['threads']} thread" + ("s" if settings["threads"] != 1 else "")) if settings.get("threads") else None,
             ("sampling" + (f" T={settings.get('temperature')}" if settings.get("temperature") is not None else "")
              + (f" top-k {settings['top_k']}" if settings.get("top_k") else "")
              + (f" top-p {settings['top_p']}" if settings.get("top_p") else "")) if settings.get("do_sample") else "greedy",
             f"prompts {', '.join(settings['prompts'])}" if settings.get("prompts") else None,
             f"n-gram lookup {settings['ngram_lookup_tokens']}" if settings.get("ngram_lookup_tokens") else None]
    return ", ".join(p for p in parts if p)


def _serving_section(serving: Sequence[Mapping]) -> str:
    """Batched-engine figures (``hf-dspark bench-batch`` / ``bench-serve``), or "" without any."""
    if not serving:
        return ""
    lines = ["## Batched serving (hf-dspark's engine)", "",
             "transformers' assisted decoding serves one sequence at a time. hf-dspark's continuous-batching "
             "engine (`hf_dspark.BatchedSpeculativeGenerator`) serves many, choosing each round who drafts and "
             "how many draft tokens each request verifies from the measured cost of a target forward; it never "
             "changes the output. Measured with `hf-dspark bench-batch` and `hf-dspark bench-serve` "
             "(see hf-dspark's `docs/serving.md`)."]
    for entry in serving:
        settings = entry.get("settings") or {}
        rows = entry.get("rows") or []
        if entry.get("kind") == "bench-batch":
            methods = [m for m in ("plain_engine", "full", "scheduler", "async") if any(m in r["ratios"] for r in rows)]
            lines += ["", f"**Fixed concurrency** ({_serving_settings(settings)}; "
                      f"{settings.get('num_prompts', '?')} prompts x {settings.get('max_new_tokens', '?')} tokens): "
                      "throughput against transformers' batched `generate` at the same concurrency"
                      + (" (given the engine's exact LM-head layout for 2-8 rows)" if settings.get("plain_head") == "fast"
                         else "") + ".", "",
                      "| concurrency | plain `generate` tok/s | " + " | ".join(_SERVING_NAMES[m] for m in methods) + " |",
                      "|---:|---:|" + "---:|" * len(methods)]
            for r in rows:
                plain = r.get("plain_tokens_per_second")
                cells = [f"{r['ratios'][m]:.2f}×" if _has(r["ratios"].get(m)) else "—" for m in methods]
                lines.append(f"| {r['concurrency']} | {plain:.1f} | " if _has(plain) else f"| {r['concurrency']} | — | ")
                lines[-1] += " | ".join(cells) + " |"
            if entry.get("outputs_equal_plain") is not None:
                lines += ["", "Every output equals plain batched `generate`: "
                          + ("yes." if entry["outputs_equal_plain"] else "**no**.")]
        elif entry.get("kind") == "bench-serve":
            modes = [m for m in ("plain", "full", "algorithm1", "async") if any(m in r["modes"] for r in rows)]
            lines += ["", f"**Requests arriving over time** ({_serving_settings(settings)}; "
                      f"{settings.get('num_requests', '?')} requests of {settings.get('min_new_tokens', '?')}-"
                      f"{settings.get('max_new_tokens', '?')} tokens, at most {settings.get('max_concurrency', '?')} "
                      "in flight): tok/s, then the per-request time per output token (TPOT) p50 in ms.", "",
                      "| arrival rate | " + " | ".join(_SERVING_NAMES[m] for m in modes) + " |",
                      "|---|" + "---:|" * len(modes)]
            for r in rows:
                rate = "all at once" if str(r["rate"]) == "inf" else f"{float(r['rate']):.2f} req/s"
                cells = []
                for m in modes:
                    v = r["modes"].get(m) or {}
                    cells.append(f"{v['tokens_per_second']:.1f}, {1e3 * v['tpot_p50']:.0f} ms"
                                 if _has(v.get("tokens_per_second")) and _has(v.get("tpot_p50")) else "—")
                lines.append(f"| {rate} | " + " | ".join(cells) + " |")
            if entry.get("outputs_equal_alone") is not None:
                lines += ["", "Every request's output equals what it gets decoded alone, in every mode and at every "
                          "rate: " + ("yes." if entry["outputs_equal_alone"] else "**no**.")]
    return "\n".join(lines) + "\n\n"


def _recipe_section(recipe: str | None) -> str:
    if not recipe:
        return "The training command was not recorded for this export."
    return "Trained with hf-dspark:\n\n```bash\n" + recipe.strip() + "\n```"


def _usage_snippet(target: str, repo_id: str, chat: bool | None = None) -> str:
    """Loading and generating; the prompt is encoded the way the drafter's training prompts were."""
    head = [
        "from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer",
        "",
        f'target_id = "{target}"',
        "tokenizer = AutoTokenizer.from_pretrained(target_id)",
        'target = AutoModelForCausalLM.from_pretrained(target_id, dtype="auto", device_map="auto")',
        f'draft = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto").to(target.device)',
        "",
    ]
    if chat is False:
        prompt = [
            "# trained on raw prompt text (no chat template), so prompt it the same way",
            'inputs = tokenizer("Question: A train travels 60 km in 45 minutes. What is its speed in km/h?\\nAnswer:",',
            '                   return_tensors="pt").to(target.device)',
        ]
    else:
        prompt = [
            'messages = [{"role": "user", "content": "Explain speculative decoding in two sentences."}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
            ").to(target.device)",
        ]
    tail = [
        "out = target.generate(**inputs, assistant_model=draft, max_new_tokens=256)  # greedy",
        "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        'print(draft.last_generation_stats["mean_accepted_length"])',
        "",
        "# sampling keeps the target's distribution exactly",
        "out = target.generate(**inputs, assistant_model=draft, do_sample=True, temperature=0.7, top_p=0.95)",
    ]
    return "\n".join(head + prompt + tail)


def _policy_description(generation_config) -> str:
    get = (lambda k: generation_config.get(k)) if isinstance(generation_config, Mapping) else (
        lambda k: getattr(generation_config, k, None)
    )
    if generation_config is None:
        return "`auto`"
    policy = get("verification_policy") or "auto"
    text = f"`{policy}`"
    if policy == "auto":
        text += " (`cost` when a latency table is set, else `full`)"
    if policy == "threshold":
        text += f" (confidence threshold {get('confidence_threshold')})"
    table = get("latency_table")
    if table:
        text += f"; `generation_config.json` holds a target latency table ({len(table)} entries)"
    ngram = get("ngram_lookup_tokens")
    if ngram == "auto":
        text += ("; n-gram rounds on with lengths from the cost curve (`ngram_lookup_tokens=\"auto\"`: copies, and "
                 "continuations of a drafted block, as long as the target's measured verification cost says they "
                 "pay; `draft.generation_config.ngram_lookup_tokens = 0` uses the drafter alone)")
    elif ngram:
        text += (f"; n-gram rounds on (`ngram_lookup_tokens={ngram}`: when the last tokens occurred before, "
                 "the tokens that followed them are verified instead of a drafted block; "
                 "`draft.generation_config.ngram_lookup_tokens = 0` uses the drafter alone)")
    return text


def _drafter_table(config, generation_config) -> str:
    vocab = (
        f"{config.draft_vocab_size} of the target's {config.vocab_size} tokens"
        if config.draft_vocab_size
        else f"full target vocabulary ({config.vocab_size})"
    )
    if config.markov_rank > 0:
        markov = f"`{config.markov_head_type}`, rank {config.markov_rank}"
    else:
        markov = "none (parallel drafting only, as DFlash)"
    confidence = "yes" if config.enable_confidence_head else "no"
    if config.enable_confidence_head and config.confidence_head_with_markov and config.markov_rank > 0:
        confidence += " (sees the previous token's Markov embedding)"
    calibration = (
        "per-position temperatures (Sequential Temperature Scaling) in `config.json`"
        if config.confidence_temperatures
        else "none"
    )
    rows = [
        ("Target", f"`{config.target_model_name}`"),
        ("Block size (tokens drafted per round)", str(config.block_size)),
        ("Target layers read", ", ".join(str(i) for i in config.target_layer_ids)),
        ("Drafter decoder layers", str(config.num_hidden_layers)),
        ("Hidden size", str(config.hidden_size)),
        ("Markov head", markov),
        ("Confidence head", confidence),
        ("Confidence calibration", calibration),
        ("Draft vocabulary", vocab),
        ("Verification policy", _policy_description(generation_config)),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def suggested_repo_id(target: str) -> str:
    return f"YOUR_ORG/{target.rstrip('/').split('/')[-1]}-DSpark"


# ----------------------------------------------------------------------------- rendering
def card_front_matter(target: str, license: str, tags: Sequence[str] = CARD_TAGS, library_name: str = "transformers") -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=target,
        library_name=library_name,
        license=license,
        pipeline_tag="text-generation",
        tags=list(tags),
    )
    return "---\n" + data.to_yaml() + "\n---\n"


def render_model_card(
    config,
    generation_config=None,
    eval_results: Sequence[Mapping] = (),
    recipe: str | None = None,
    license: str = DEFAULT_LICENSE,
    repo_id: str | None = None,
    serving: Sequence[Mapping] = (),
) -> str:
    """Return the README.md text (YAML metadata + body) of an exported drafter (``serving``: summaries
    from :func:`load_serving_results`)."""
    from hf_dspark.targets import ALIAS_HUB_IDS

    target = config.target_model_name
    if not target:
        raise ValueError("render_model_card needs config.target_model_name (the Hub id of the target)")
    target = ALIAS_HUB_IDS.get(target, target)  # a built-in alias names a Hub model
    repo_id = repo_id or suggested_repo_id(target)
    template = string.Template(TEMPLATE_PATH.read_text())
    text = template.substitute(
        front_matter=card_front_matter(target, license),
        title=f"DSpark drafter for {target}",
        target=target,
        block_size=config.block_size,
        weights_note=(
            "The drafter borrows the target's embedding table and LM head at run time, so this repository\n"
            "holds only the drafter's own layers and heads;"
            if config.embeddings_from_target
            else "This checkpoint stores its own copy of the embedding table and LM head;"
        ),
        usage=_usage_snippet(target, repo_id, getattr(config, "prompt_chat_template", None)),
        drafter_table=_drafter_table(config, generation_config),
        results=_results_section(eval_results),
        serving=_serving_section(serving),
        recipe=_recipe_section(recipe),
        repo_id=repo_id,
    )
    return text.rstrip() + "\n"


def render_engine_card(config, engine: str, license: str = DEFAULT_LICENSE) -> str:
    """Short README.md for a DeepSpec / vLLM / SGLang / speculators export folder (serve command and provenance)."""
    target = config.target_model_name
    if engine in ("deepspec", "speculators"):
        return _layout_card(config, engine, license)
    if engine == "vllm":
        serve = (
            f"vllm serve {target} \\\n  --speculative-config "
            f"'{{\"method\": \"dspark\", \"model\": \"<this folder or repo>\", "
            f"\"num_speculative_tokens\": {config.block_size}}}'"
        )
    else:
        serve = (
            f"python -m sglang.launch_server --model-path {target} \\\n"
            "  --speculative-algorithm DSPARK \\\n"
            "  --speculative-draft-model-path <this folder or repo> \\\n"
            f"  --speculative-num-draft-tokens {config.block_size + 1}"
        )
    body = (
        f"# DSpark drafter for {target} ({engine} layout)\n\n"
        f"Written by `hf-dspark export --format {engine}` for {engine}'s native DSpark loader "
        "(`architectures: [\"Qwen3DSparkModel\"]`, `model_type: \"qwen3\"`, so no remote code is needed). "
        "The field mapping and its sources are in hf-dspark's `docs/formats.md`.\n\n"
        f"```bash\n{serve}\n```\n\n"
        "For `transformers` (`generate(assistant_model=...)`), use the `hub` export of the same drafter.\n"
    )
    return card_front_matter(target, license, tags=CARD_TAGS + (engine,), library_name=engine) + "\n" + body


def _layout_card(config, layout: str, license: str) -> str:
    target = config.target_model_name
    if layout == "deepspec":
        architecture = "Gemma4DSparkModel" if config.backbone_type == "gemma4" else "Qwen3DSparkModel"
        what = (f"DeepSpec's `save_pretrained` layout (`architectures: [\"{architecture}\"]`), which DeepSpec's "
                "own classes read")
    else:
        what = ("vLLM speculators' DSpark format (`speculators_model_type: \"dspark\"`, read by "
                "`speculators.models.dspark.DSparkDraftModel`; speculators documents serving its checkpoints "
                "with `vllm serve <checkpoint>`, not run by hf-dspark)")
    body = (
        f"# DSpark drafter for {target} ({layout} layout)\n\n"
        f"Written by `hf-dspark export --format {layout}`: {what}. The field mapping and what was verified are in "
        "hf-dspark's `docs/formats.md`.\n\n"
        f"`hf_dspark.load_drafter(<this folder>)` loads it back; `hf-dspark convert --from {layout} <this folder> "
        "--output OUT` writes the `transformers` (Hub, remote code) layout.\n"
    )
    return card_front_matter(target, license, tags=CARD_TAGS + (layout,), library_name="transformers") + "\n" + body


# ----------------------------------------------------------------------------- example
EXAMPLE_EVAL = {
    "settings": {
        "target": "Qwen/Qwen3-4B",
        "policy": "cost",
        "temperature": 0.0,
        "max_new_tokens": 256,
        "hardware": "EXAMPLE ONLY: illustrative numbers, not a measurement",
    },
    "gsm8k": {
        "num_prompts": 100,
        "mean_accepted_length": 4.12,
        "per_position_acceptance": [0.86, 0.71, 0.58, 0.46, 0.36, 0.27, 0.2],
        "tokens_per_second": 88.0,
        "baseline_tokens_per_second": 31.0,
        "speedup": 2.84,
        "outputs_match_baseline": True,
    },
    "humaneval": {
        "num_prompts": 100,
        "mean_accepted_length": 4.61,
        "speedup": 3.1,
        "outputs_match_baseline": True,
    },
    "mean_accepted_length": 4.365,
    "speedup": 2.97,
}


def render_example_card() -> str:
    """The card of a fictitious Qwen3-4B drafter with illustrative numbers (``model_cards/dspark_drafter.md``)."""
    from hf_dspark.models.dspark.configuration_dspark import DSparkConfig

    config = DSparkConfig(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        target_layer_ids=[1, 9, 17, 25, 33],
        num_target_layers=36,
        block_size=7,
        mask_token_id=151669,
        markov_rank=256,
        embeddings_from_target=True,
        target_model_name="Qwen/Qwen3-4B",
    )
    generation = {"verification_policy": "auto", "latency_table": None}
    recipe = (
        "hf-dspark prepare-data --target Qwen/Qwen3-4B --prompts prompts.jsonl --output data/\n"
        "hf-dspark build-cache --target Qwen/Qwen3-4B --data data/ --output cache/ --dtype bfloat16\n"
        "hf-dspark train --target Qwen/Qwen3-4B --cache cache/ --output drafter/"
    )
    return render_model_card(config, generation, [EXAMPLE_EVAL], recipe=recipe, repo_id="YOUR_ORG/Qwen3-4B-DSpark")


if __name__ == "__main__":
    print(render_example_card(), end="")
