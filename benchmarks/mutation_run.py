"""Mutation run over the core helpers: how many small, plausible bugs do the related tests catch?

Not part of CI (it takes about half an hour on one core). For each target below the script parses the
module, and in each listed function makes one small change at a time with Python's ``ast``:

* comparison flips: ``<`` <-> ``<=``, ``>`` <-> ``>=``, ``==`` <-> ``!=``;
* arithmetic flips: ``+`` <-> ``-``, ``*`` <-> ``/``;
* off-by-one: an integer literal ``n`` in a comparison, arithmetic, assignment, return or slice
  becomes ``n + 1``;
* boolean flips: ``and`` <-> ``or``, ``not x`` -> ``x``;
* dropped checks: an ``if ...: raise`` statement, or a call statement to a ``_check*`` helper, removed;

then runs the target's small test selection (``-x``, with a timeout). A mutant is *killed* when the
selection fails (or times out), *survives* when it passes. The mutated file lives in a copy of the
repository (``hf_dspark/`` and ``tests/`` copied to a temporary folder), never in the checkout, and the
original text is written back after every mutant in a ``finally`` block, so Ctrl-C leaves nothing
mutated anywhere. Results: ``--out`` (JSON: score, counts, every mutant with its outcome) and stdout.

    OMP_NUM_THREADS=1 python benchmarks/mutation_run.py --out mutation_results.json
    OMP_NUM_THREADS=1 python benchmarks/mutation_run.py --only losses --list   # just list the mutants

``--named`` runs only the curated mutants of issue 34 (the bugs the audit named), each of which the
tests in ``tests/test_named_bugs.py`` must kill. ``--survivors-of earlier.json`` reruns only the mutants
that survived an earlier run (matched by line and text, so only while the library code is unchanged),
e.g. after adding tests: the others stay killed, since a selection that only grew still fails where it
failed. Results and survivors: docs/mutation.md.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    name: str
    path: str  # relative to the repository root
    functions: list[str]  # "name" or "Class.method"
    tests: list[list[str]]  # pytest invocations (files, -k expression), run in turn until one fails


NB = "tests/test_named_bugs.py"
TARGETS = [
    Target("verification", "hf_dspark/decoding/verification.py",
           ["accept_probabilities", "residual_distribution", "verify_block"],
           [[NB, "-k", "residual or verify_block"],
            ["tests/decoding/test_batched.py", "-k", "greedy_keeps or exact_enumeration or draws_follow or nothing_submitted"]]),
    Target("scheduling_rules", "hf_dspark/models/dspark/scheduling_dspark.py",
           ["prefix_survival", "threshold_length", "prefix_length", "cost_length", "top_k_prefix"],
           [[NB, "tests/decoding/test_scheduling.py"]]),
    Target("policies", "hf_dspark/models/dspark/policies_dspark.py",
           ["CostPolicy.draft_length", "ThresholdPolicy.verify_counts"],
           [["tests/decoding/test_batched.py", "-k", "planner_draft_length or greedy_batched_equals"]]),
    Target("submit_length", "hf_dspark/models/dspark/generation_dspark.py",
           ["DSparkCandidateGenerator._submit_length"],
           [[NB, "-k", "policy"]]),
    Target("round_plan", "hf_dspark/decoding/round_plan.py",
           ["RoundPlanner.prediction"],
           [["tests/decoding/test_batched.py", "-k", "planner_reads or planner_draft_length or greedy_schedule_looks"]]),
    Target("calibration", "hf_dspark/decoding/calibration.py",
           ["_ece_rows", "expected_calibration_error", "prefix_survival_probabilities"],
           [["tests/decoding/test_calibration.py"]]),
    Target("losses", "hf_dspark/losses.py",
           ["l1_to_dense_target", "l1_to_topk_target", "dspark_loss"],
           [[NB, "-k", "l1 or ce_ or dspark_loss"], ["tests/checkpoints/test_deepspec_fixtures.py", "-k", "training_path"]]),
    Target("loading", "hf_dspark/checkpoints/loading.py",
           ["_check_tensor_names", "load_drafter"],
           [[NB, "-k", "load_drafter"],
            ["tests/checkpoints/test_formats.py", "-k", "non_dspark or reduced_vocabulary or deepspec_folder_loads"]]),
    Target("markov", "hf_dspark/models/dspark/modeling_dspark.py",
           ["DSparkDraftModel.calibrated_confidence", "DSparkDraftModel.sample_block"],
           [[NB, "-k", "sts or markov or anchors or policy"], ["tests/models/test_modeling.py", "-k", "markov or heads"]]),
    Target("anchors", "hf_dspark/models/dspark/training_dspark.py",
           ["sample_anchor_positions"],
           [[NB, "-k", "sts or markov or anchors or policy"], ["tests/models/test_modeling.py", "-k", "markov or heads"]]),
    Target("markov_head", "hf_dspark/models/dspark/modeling_dspark_layers.py",
           ["DSparkMarkovHead.embed_previous", "DSparkMarkovHead.step"],
           [[NB, "-k", "markov"], ["tests/models/test_modeling.py", "-k", "markov or heads or training_forward"]]),
    Target("warpers", "hf_dspark/models/dspark/warpers_dspark.py",
           ["FusedTopKTopPWarper.__call__", "FusedTopKTopPWarper.can_fuse", "top_p_of_survivors"],
           [[NB, "-k", "fused"], ["tests/models/test_fused_warpers.py"], ["tests/decoding/test_support_sampling.py"]]),
    Target("support_sampling", "hf_dspark/models/dspark/sampling_dspark.py",
           ["SupportWarp.from_processors", "SupportWarp.law", "ProposalLaw.at", "speculative_sample"],
           [["tests/decoding/test_support_sampling.py"]]),
    Target("summary", "hf_dspark/evaluation/summary.py",
           ["_tokens_per_second", "_ratio", "_drafter_summary", "_tau"],
           [[NB, "-k", "summary"], ["tests/evaluation/test_evaluation.py", "-k", "macro_average or bootstrap"]]),
]

# The bugs issue 34 named, as (target name, function, original text, mutated text).
NAMED = [
    ("markov", "DSparkDraftModel.calibrated_confidence", "confidence_logits / t", "confidence_logits * t"),
    ("submit_length", "DSparkCandidateGenerator._survival",
     "prefix_survival(self.draft.calibrated_confidence(confidence[0, :n_max])).tolist()",
     "self.draft.calibrated_confidence(confidence[0, :n_max]).tolist()"),
    ("scheduling_rules", "threshold_length", "if a < threshold:", "if a <= threshold:"),
    ("losses", "l1_to_topk_target", " + (1.0 - p_draft_at.sum(-1)).clamp(min=0.0)", ""),
    ("anchors", "sample_anchor_positions", "mask[:, :-1] & mask[:, 1:]", "mask[:, :-1]"),
    ("loading", "load_drafter", "        _check_tensor_names(stored, set(model.state_dict()), where)\n", ""),
    ("warpers", "top_p_of_survivors", "cumulative <= (1 - top_p)", "cumulative < (1 - top_p)"),
    ("losses", "dspark_loss", "ce_weights = weights * ce_valid", "ce_weights = weights"),
    ("markov", "DSparkDraftModel.sample_block", "prev_draft = draft_ids", "prev_draft = prev_draft"),
]

COMPARE_FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq}
BINOP_FLIPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
          ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    target: str
    function: str
    line: int
    kind: str
    original: str  # the source text replaced
    mutated: str
    start: int = field(repr=False, default=0)  # byte offsets in the file
    end: int = field(repr=False, default=0)


def _line_offsets(data: bytes) -> list[int]:
    offsets, total = [0], 0
    for line in data.splitlines(keepends=True):
        total += len(line)
        offsets.append(total)
    return offsets


def _functions(tree: ast.Module, names: list[str]):
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{item.name}"] = item
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"functions not found: {missing}")
    return [(n, found[n]) for n in names]


def _skipped(node: ast.AST, parents: dict) -> bool:
    """Docstrings, default values, annotations and f-string internals are not mutated."""
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.JoinedStr) or isinstance(parent, ast.arguments):
            return True
        if isinstance(parent, (ast.AnnAssign, ast.arg)) and child is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) and child is parent.returns:
            return True
        if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id in ("ValueError", "TypeError"):
            return True  # error messages
        child = parent
    return False


def generate_mutants(target: Target) -> list[Mutant]:
    data = (ROOT / target.path).read_bytes()
    offsets = _line_offsets(data)
    tree = ast.parse(data)
    mutants = []

    def span(node):
        return offsets[node.lineno - 1] + node.col_offset, offsets[node.end_lineno - 1] + node.end_col_offset

    def add(fname, node, kind, new_node=None, text=None):
        start, end = span(node)
        original = data[start:end].decode()
        mutated = text if text is not None else "(" + ast.unparse(new_node) + ")"
        mutants.append(Mutant(target.name, fname, node.lineno, kind, original, mutated, start, end))

    for fname, func in _functions(tree, target.functions):
        parents = {}
        for parent in ast.walk(func):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
        for node in ast.walk(func):
            if node is not func and _skipped(node, parents):
                continue
            if isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    if type(op) in COMPARE_FLIPS:
                        new = copy.deepcopy(node)
                        new.ops[i] = COMPARE_FLIPS[type(op)]()
                        add(fname, node, f"{SYMBOL[type(op)]} -> {SYMBOL[COMPARE_FLIPS[type(op)]]}", new)
            elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_FLIPS:
                new = copy.deepcopy(node)
                new.op = BINOP_FLIPS[type(node.op)]()
                add(fname, node, f"{SYMBOL[type(node.op)]} -> {SYMBOL[type(new.op)]}", new)
            elif isinstance(node, ast.BoolOp):
                new = copy.deepcopy(node)
                new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
                add(fname, node, f"{SYMBOL[type(node.op)]} -> {SYMBOL[type(new.op)]}", new)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                add(fname, node, "not x -> x", node.operand)
            elif (isinstance(node, ast.Constant) and type(node.value) is int
                  and isinstance(parents.get(node), (ast.Compare, ast.BinOp, ast.Assign, ast.Return, ast.Slice))):
                # counts, bounds and indices; not dims and call arguments (those crash, which says little)
                add(fname, node, "n -> n + 1", text=str(node.value + 1))
            elif isinstance(node, ast.If) and len(node.body) == 1 and isinstance(node.body[0], ast.Raise) and not node.orelse:
                add(fname, node, "drop check", text="pass")
            elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                  and isinstance(node.value.func, ast.Name) and node.value.func.id.startswith("_check")):
                add(fname, node, "drop check", text="pass")
    return mutants


def named_mutants() -> list[Mutant]:
    by_name = {t.name: t for t in TARGETS}
    mutants = []
    for target_name, fname, old, new in NAMED:
        data = (ROOT / by_name[target_name].path).read_bytes()
        start = data.find(old.encode())
        if start < 0 or data.count(old.encode()) != 1:
            raise SystemExit(f"named mutant not found exactly once in {target_name}: {old!r}")
        line = data[:start].count(b"\n") + 1
        mutants.append(Mutant(target_name, fname, line, "named", old, new, start, start + len(old.encode())))
    return mutants


def make_copy(workdir: Path) -> Path:
    """hf_dspark/ and tests/ in ``workdir/main`` (``../shared`` linked) so the checkout is never mutated."""
    copy_root = workdir / "main"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "hf_dspark", copy_root / "hf_dspark", ignore=ignore)
    shutil.copytree(ROOT / "tests", copy_root / "tests", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "recipes", "docs", "scripts", "examples"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy_root / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, copy_root / name)
    if (ROOT.parent / "shared").exists():
        (workdir / "shared").symlink_to(ROOT.parent / "shared")
    return copy_root


def run_tests(copy_root: Path, groups: list[list[str]], timeout: float) -> tuple[str, float]:
    env = dict(os.environ, PYTHONPATH=str(copy_root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    for group in groups:
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *group],
                                  cwd=copy_root, env=env, capture_output=True, text=True,
                                  timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start
        if proc.returncode == 5:
            raise SystemExit(f"no tests collected for {group}")
        if proc.returncode != 0:
            return "killed", time.perf_counter() - start
    return "survived", time.perf_counter() - start


def write_report(out: str, results: list[dict], targets: dict, started: float, complete: bool) -> dict:
    """Written after every mutant, so an interrupted run leaves its partial score behind."""
    survivors = [r for r in results if r["outcome"] == "survived"]
    killed = len(results) - len(survivors)
    report = {
        "complete": complete, "mutants": len(results), "killed": killed, "survived": len(survivors),
        "score": round(killed / len(results), 4) if results else None,
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "per_target": {name: {"mutants": sum(r["target"] == name for r in results),
                              "survived": sum(r["target"] == name for r in survivors)} for name in targets},
        "survivors": survivors, "results": results,
    }
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="mutation_results.json")
    parser.add_argument("--only", nargs="*", help="target names (default: all)")
    parser.add_argument("--named", action="store_true", help="only the curated mutants of issue 34")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--survivors-of", metavar="JSON",
                        help="only the mutants that survived in this earlier report (after adding tests: the "
                             "others stay killed, since selections only grow)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that each selection passes unmutated (only right after a run that did)")
    args = parser.parse_args()

    targets = {t.name: t for t in TARGETS if not args.only or t.name in args.only}
    if args.named:
        mutants = [m for m in named_mutants() if m.target in targets]
    else:
        mutants = [m for t in targets.values() for m in generate_mutants(t)]
    if args.survivors_of:
        key = lambda r: (r["target"], r["function"], r["line"], r["kind"], r["original"], r["mutated"])  # noqa: E731
        earlier = {key(r) for r in json.loads(Path(args.survivors_of).read_text())["survivors"]}
        mutants = [m for m in mutants if key(vars(m)) in earlier]
    if args.list:
        for m in mutants:
            print(f"{m.target:12s} {m.function}:{m.line} {m.kind:12s} {m.original!r} -> {m.mutated!r}")
        print(f"{len(mutants)} mutants")
        return

    results, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf_dspark_mutation_") as tmp:
        copy_root = make_copy(Path(tmp))
        for target in [] if args.skip_baseline else targets.values():  # unmutated selections must pass
            outcome, seconds = run_tests(copy_root, target.tests, args.timeout)
            if outcome != "survived":
                raise SystemExit(f"the tests of {target.name} fail without any mutation ({outcome}): {target.tests}")
            print(f"baseline {target.name}: passes in {seconds:.0f} s", flush=True)
        for i, m in enumerate(mutants, 1):
            target = targets[m.target]
            path = copy_root / target.path
            original = path.read_bytes()
            try:
                path.write_bytes(original[:m.start] + m.mutated.encode() + original[m.end:])
                outcome, seconds = run_tests(copy_root, target.tests, args.timeout)
            finally:
                path.write_bytes(original)
            results.append({"target": m.target, "function": m.function, "line": m.line, "kind": m.kind,
                            "original": m.original, "mutated": m.mutated, "outcome": outcome,
                            "seconds": round(seconds, 1)})
            write_report(args.out, results, targets, started, complete=False)
            print(f"[{i}/{len(mutants)}] {outcome:8s} {m.target} {m.function}:{m.line} "
                  f"{m.original!r} -> {m.mutated!r} ({seconds:.0f} s)", flush=True)

    report = write_report(args.out, results, targets, started, complete=True)
    killed, survivors = report["killed"], report["survivors"]
    print(f"\nscore {killed}/{len(results)} = {report['score']:.1%} killed in {report['minutes']} min")
    for r in survivors:
        print(f"SURVIVED {r['target']} {r['function']}:{r['line']} {r['kind']}: {r['original']!r} -> {r['mutated']!r}")


if __name__ == "__main__":
    main()
