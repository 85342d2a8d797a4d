"""One prepared device check (issue 30 item 7): correctness, placement, host syncs, FSDP and bench-oracle.

Runs in at most 8 minutes on one H100 and writes ONE JSON file, ``<--output DIR>/gpu_check.json``::

    python benchmarks/gpu_check.py --output results/gpu_check            # CUDA if available
    python benchmarks/gpu_check.py --device cpu --quick --output /tmp/gc  # tiny models (CI)

Checks (each wrapped: a failure is recorded with its traceback and the others still run):

* ``greedy_fp32``: greedy ``generate(assistant_model=drafter)`` equals plain ``generate`` (tiny Qwen3, fp32);
* ``sampling_chi_square``: the joint distribution of two sampled tokens matches the target's exact one;
* ``bf16_near_ties``: in bf16, greedy outputs equal plain or part only at numerical near-ties (<= 2 ulps);
* ``engine_fp32``: the batched engine (``full`` scheduler, 4 requests) equals plain ``generate``;
* ``placement_drafter_follows_target``: a drafter loaded on the CPU moves to the target's device;
* ``placement_split_target``: a target dispatched by accelerate (CUDA: layers over GPU and CPU; CPU:
  layers over CPU and disk) decodes exactly as the target in memory;
* ``host_syncs``: host synchronisations per round of greedy and sampling ``generate`` and the engine
  (CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` warnings; CPU: a counting harness of value reads);
* ``fsdp_save_load``: one-rank FSDP2 (``fully_shard``; nccl on CUDA, gloo on CPU) trains a drafter a step; the
  full state dict gathered from it is saved with ``save_pretrained`` and loads back equal (skipped, with the reason, where torch.distributed is unusable);
* ``bench_oracle``: ``hf-dspark bench-oracle`` at tau 2/4/6 (CUDA: a random-weight Qwen3-4B-shaped bf16 target
  with a 5-layer drafter; ``--quick``: a tiny config), ``generate`` and the engine at batch 1 and 8.

Exit code 1 when a correctness check failed (``bench_oracle`` is a correctness check too: it asserts
plain's output); skips do not fail. No network is needed: every model is built from code or from the
configs shipped in ``hf_dspark/assets/target_configs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_dspark import DSparkDraftModel, DSparkGenerationConfig  # noqa: E402
from hf_dspark.commands.bench_oracle import benchmark_oracle, fresh_drafter, machine_info  # noqa: E402
from hf_dspark.decoding.batched import BatchedSpeculativeGenerator  # noqa: E402
from hf_dspark.evaluation.measure import greedy_divergence  # noqa: E402


class Skip(Exception):
    """A check that cannot run here; its reason is recorded."""


# ----------------------------------------------------------------------------- tiny models
def tiny_target(device, dtype=torch.float32, seed=0, vocab_size=96, eos_token_id=2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model.to(device=device, dtype=dtype)


def tiny_drafter(target, seed=0, scale=0.5, **overrides):
    """A fresh drafter with non-trivial random weights (its Markov W2 is not left at zero)."""
    torch.manual_seed(seed)
    settings = dict(num_hidden_layers=1, block_size=5, markov_rank=8, target_layer_ids=[0, 2])
    settings.update(overrides)
    draft = DSparkDraftModel.from_target(target, **settings)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            value = 1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name else \
                torch.randn(p.shape, generator=gen) * scale / fan_in ** 0.5
            p.copy_(value.to(p.dtype))
    draft.generation_config.verification_policy = "full"
    return draft.eval()


def prompts(n, device, vocab=96, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, length), generator=gen).to(device) for _ in range(n)]


# ----------------------------------------------------------------------------- checks
def check_greedy_fp32(device, quick):
    target = tiny_target(device)
    draft = tiny_drafter(target, seed=10)
    same, taus = 0, []
    ps = prompts(4 if quick else 8, device)
    for ids in ps:
        plain = target.generate(ids, max_new_tokens=40, do_sample=False)
        spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
        same += torch.equal(plain, spec)
        taus.append(draft.last_generation_stats["mean_accepted_length"])
    ok = same == len(ps)
    return ok, {"identical": same, "prompts": len(ps), "mean_tau": sum(taus) / len(taus)}


def _step_probs(target, prefix):
    with torch.no_grad():
        return torch.softmax(target(prefix).logits[0, -1].double(), -1).cpu()


def exact_joint(target, ids):
    """Exact P(x2, x3) of plain sampling at temperature 1 (x1 marginalised)."""
    V = target.config.vocab_size
    joint = torch.zeros(V, V, dtype=torch.float64)
    p1 = _step_probs(target, ids)
    for x1 in range(V):
        pre1 = torch.cat([ids, torch.tensor([[x1]], device=ids.device)], 1)
        p2 = _step_probs(target, pre1)
        for x2 in range(V):
            p3 = _step_probs(target, torch.cat([pre1, torch.tensor([[x2]], device=ids.device)], 1))
            joint[x2] += p1[x1] * p2[x2] * p3
    return joint


def chi_square(counts, expected_p, alpha_z=3.09):
    """(rejects, statistic, critical value) of a chi-square goodness-of-fit test (cells < 5 expected pooled)."""
    n = counts.sum().item()
    exp, obs = expected_p.flatten() * n, counts.flatten().double()
    if (obs[exp == 0] > 0).any():
        return True, math.inf, 0.0
    big = exp >= 5
    stat = (((obs[big] - exp[big]) ** 2) / exp[big]).sum().item()
    df = int(big.sum().item()) - 1
    rest_e, rest_o = exp[~big].sum().item(), obs[~big].sum().item()
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    crit = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty quantile
    return stat > crit, stat, crit


def check_sampling_chi_square(device, quick):
    target = tiny_target(device, seed=7, vocab_size=6, eos_token_id=None)
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=3, block_size=4, markov_rank=4, mask_token_id=5)
    with torch.no_grad():
        for p in draft.parameters():
            p.mul_(3.0)  # a drafter clearly different from the target
    ids = torch.tensor([[1, 3, 2, 4]], device=device)
    runs = 600 if quick else 1500
    counts = torch.zeros(6, 6, dtype=torch.long)
    for s in range(runs):
        torch.manual_seed(s)
        out = target.generate(ids, max_new_tokens=3, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                              assistant_model=draft)[0].tolist()
        counts[out[5], out[6]] += 1
    rejects, stat, crit = chi_square(counts, exact_joint(target, ids))
    return not rejects, {"runs": runs, "chi2": stat, "critical": crit,
                         "drafted": draft.last_generation_stats["submitted_lengths"][:1]}


def check_bf16_near_ties(device, quick):
    divergences, identical, total = [], 0, 0
    for seed in range(2 if quick else 4):
        target = tiny_target(device, torch.bfloat16, seed=seed)
        draft = tiny_drafter(target, seed=seed + 10).to(torch.bfloat16)
        for ids in prompts(3 if quick else 5, device, seed=seed):
            plain = target.generate(ids, max_new_tokens=40, do_sample=False)
            spec = target.generate(ids, max_new_tokens=40, do_sample=False, assistant_model=draft)
            report = greedy_divergence(target, ids.shape[1], plain, spec)
            total += 1
            identical += report is None
            if report is not None:
                divergences.append(report)
    ok = all(r.get("margin_ulps", math.inf) <= 2.0 for r in divergences) and identical >= total // 2
    return ok, {"identical": identical, "outputs": total, "divergences": divergences}


def check_engine_fp32(device, quick):
    target = tiny_target(device)
    draft = tiny_drafter(target, seed=10)
    ps = [p[0].tolist() for p in prompts(4 if quick else 8, device)]
    plain = [target.generate(torch.tensor([p], device=device), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
             for p in ps]
    engine = BatchedSpeculativeGenerator(target, draft, DSparkGenerationConfig(verification_policy="full"), max_batch_size=4)
    out = engine.generate(ps, max_new_tokens=32)
    engine.close()
    same = sum(a == b for a, b in zip(out, plain))
    tau = (engine.stats["accepted_draft_tokens"] + engine.stats["request_rounds"]) / max(engine.stats["request_rounds"], 1)
    return same == len(ps), {"identical": same, "prompts": len(ps), "tau": tau}


def check_drafter_follows_target(device, quick):
    target = tiny_target(device)
    draft = tiny_drafter(target.to("cpu"), seed=10)  # built (and left) on the CPU
    target.to(device)
    with tempfile.TemporaryDirectory() as folder:
        draft.save_pretrained(folder)
        from hf_dspark.checkpoints.loading import load_drafter

        loaded = load_drafter(folder, target=target)
    placed = str(next(loaded.parameters()).device)
    ids = prompts(1, device)[0]
    plain = target.generate(ids, max_new_tokens=24, do_sample=False)
    spec = target.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=loaded)
    ok = torch.device(placed).type == torch.device(device).type and torch.equal(plain, spec)
    return ok, {"drafter_device": placed, "target_device": str(target.device), "identical": torch.equal(plain, spec)}


def check_split_target(device, quick):
    try:
        import accelerate
    except ImportError:
        raise Skip("accelerate is not installed")
    target = tiny_target("cpu")
    draft = tiny_drafter(target, seed=10)
    if torch.device(device).type == "cuda":
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
                      "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": 0}
    else:
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                      "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk",
                      "model.rotary_emb": "cpu", "lm_head": "disk"}
    ps = prompts(3, "cpu")
    plain = [target.generate(p, max_new_tokens=24, do_sample=False)[0].tolist() for p in ps]
    with tempfile.TemporaryDirectory() as folder:
        import copy

        split = accelerate.dispatch_model(copy.deepcopy(target), device_map=device_map, offload_dir=folder)
        first = split.get_input_embeddings().weight.device
        outs = [split.generate(p.to(first), max_new_tokens=24, do_sample=False,
                               assistant_model=draft)[0].tolist() for p in ps]
        tau = draft.last_generation_stats["mean_accepted_length"]
    same = sum(a == b for a, b in zip(outs, plain))
    return same == len(ps), {"device_map": {k: str(v) for k, v in device_map.items()}, "identical": same,
                             "prompts": len(ps), "tau": tau}


class _ReadCounter(torch.overrides.TorchFunctionMode):
    """CPU stand-in for ``set_sync_debug_mode``: counts the calls that read a tensor's value on the host
    (item, tolist, bool/int/float, nonzero, boolean-mask indexing)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS or (func is torch.Tensor.__getitem__ and len(args) > 1 and isinstance(args[1], torch.Tensor)
                                  and args[1].dtype == torch.bool):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs(device):
    """Yields a dict whose ``"syncs"`` is filled on exit."""
    result = {"syncs": 0}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["syncs"] = sum("synchroniz" in str(w.message).lower() for w in caught)
        result["method"] = "torch.cuda.set_sync_debug_mode('warn')"
    else:
        counter = _ReadCounter()
        with counter:
            yield result
        result["syncs"] = counter.count
        result["method"] = "counting harness (tensor value reads on the host)"


def check_host_syncs(device, quick):
    target = tiny_target(device, eos_token_id=None)  # every run decodes its full length
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=10)
    ids = prompts(1, device)[0]
    out = {}
    for name, kwargs in (("generate_greedy", dict(do_sample=False)),
                         ("generate_sampling", dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8))):
        target.generate(ids, max_new_tokens=8, assistant_model=draft, **kwargs)  # warm-up outside the count
        torch.manual_seed(0)
        with count_syncs(device) as counted:
            target.generate(ids, max_new_tokens=48, assistant_model=draft, **kwargs)
        rounds = draft.last_generation_stats["rounds"]
        out[name] = {"syncs": counted["syncs"], "rounds": rounds, "per_round": counted["syncs"] / max(rounds, 1),
                     "method": counted["method"]}
    engine = BatchedSpeculativeGenerator(target, draft, DSparkGenerationConfig(verification_policy="full"), max_batch_size=4)
    ps = [p[0].tolist() for p in prompts(4, device)]
    engine.generate(ps, max_new_tokens=8)
    with count_syncs(device) as counted:
        engine.generate(ps, max_new_tokens=48)
    engine.close()
    rounds = engine.stats["rounds"]
    out["engine_greedy_4_requests"] = {"syncs": counted["syncs"], "per_round": counted["syncs"] / max(rounds, 1),
                                       "method": counted["method"]}
    # a measurement, not a pass/fail check: the targets (<= 4 greedy, <= 8 sampling) are stated beside it
    out["targets_per_round"] = {"generate_greedy": 4, "generate_sampling": 8}
    return True, out


def check_fsdp_save_load(device, quick):
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("torch.distributed is not available in this build")
    cuda = torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda and not dist.is_nccl_available():
        raise Skip("NCCL is not available")
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard  # FSDP2: runs on CPU with gloo too
    except ImportError as error:
        raise Skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not importable: {error}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    started = not dist.is_initialized()
    if started:
        try:
            dist.init_process_group(backend, rank=0, world_size=1)
        except Exception as error:  # a machine without a usable backend: skip with the reason
            raise Skip(f"init_process_group({backend!r}) failed: {type(error).__name__}: {error}")
    try:
        target = tiny_target(device)
        draft = tiny_drafter(target, seed=10)
        before = {k: v.detach().clone() for k, v in draft.state_dict().items()}
        try:
            wrapped = fully_shard(draft)  # the same module object, its parameters now sharded DTensors
        except Exception as error:
            raise Skip(f"fully_shard could not wrap the drafter on {device} with {backend}: {type(error).__name__}: {error}")
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        ids = torch.randint(3, 96, (1, 12), device=device)
        with torch.no_grad():
            hidden = target(ids, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[i + 1] for i in draft.config.target_layer_ids], -1)
        out = wrapped(input_ids=ids, target_hidden_states=features, num_anchors=4,
                      generator=torch.Generator(device=device).manual_seed(0))
        logits = out.draft_logits.float().flatten(0, -2)
        loss = torch.nn.functional.cross_entropy(logits, out.target_ids.flatten().clamp(min=0), reduction="none")
        loss = (loss * out.eval_mask.flatten()).sum() / out.eval_mask.sum().clamp(min=1)
        loss.backward()
        optimizer.step()
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        changed = any(not torch.equal(full[k].cpu(), before[k].cpu()) for k in full if k in before)
        with tempfile.TemporaryDirectory() as folder:
            draft.save_pretrained(folder, state_dict=full)
            loaded = DSparkDraftModel.from_pretrained(folder)
            saved = loaded.state_dict()
        equal = all(torch.equal(saved[k].cpu(), full[k].cpu()) for k in full if k in saved)
        missing = sorted(set(full) - set(saved))
        return equal and changed and not missing, {"backend": backend, "weights_changed": changed,
                                                   "loaded_equal": equal, "missing_keys": missing[:5],
                                                   "loss": float(loss.detach())}
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def check_bench_oracle(device, quick):
    cuda = torch.device(device).type == "cuda"
    from hf_dspark.random_target import random_target_from_config

    if cuda:
        target = random_target_from_config("qwen3-4b", dtype=torch.bfloat16, device=device)
        draft = fresh_drafter(target, layers=5, block_size=7)
        num_prompts, prompt_length, new_tokens = 8, 64, 96
    else:
        config = {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 512,
                  "tie_word_embeddings": True, "rope_theta": 1000000, "max_position_embeddings": 4096,
                  "rms_norm_eps": 1e-6}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(config, handle)
        target = random_target_from_config(handle.name, dtype=torch.float32, device=device)
        os.unlink(handle.name)
        draft = fresh_drafter(target, layers=2 if quick else 5, block_size=7)
        num_prompts, prompt_length, new_tokens = 8, 16, 48 if quick else 96
    vocab = target.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ps = torch.randint(0, vocab, (num_prompts, prompt_length), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as cache:
        out = benchmark_oracle(target, draft, ps, new_tokens, [2, 4, 6], batch_sizes=[1, 8], cache_dir=cache,
                               profile_repeats=3 if quick else 5, progress=lambda line: print("  " + line, flush=True))
    out["settings"] = {"target": target.config._name_or_path, "dtype": str(target.dtype), "draft_layers":
                       draft.config.num_hidden_layers, "block_size": 7, "num_prompts": num_prompts,
                       "prompt_length": prompt_length, "max_new_tokens": new_tokens}
    out.pop("profile", None)
    return True, out


CHECKS = [
    ("greedy_fp32", check_greedy_fp32, True),
    ("sampling_chi_square", check_sampling_chi_square, True),
    ("bf16_near_ties", check_bf16_near_ties, True),
    ("engine_fp32", check_engine_fp32, True),
    ("placement_drafter_follows_target", check_drafter_follows_target, True),
    ("placement_split_target", check_split_target, True),
    ("host_syncs", check_host_syncs, False),
    ("fsdp_save_load", check_fsdp_save_load, True),
    ("bench_oracle", check_bench_oracle, True),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models and fewer samples everywhere")
    parser.add_argument("--output", required=True, help="folder for gpu_check.json")
    parser.add_argument("--only", nargs="+", default=None, choices=[name for name, _, _ in CHECKS],
                        help="run only these checks")
    args = parser.parse_args(argv)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check.json"
    report = {"machine": machine_info(torch.device(args.device)), "quick": args.quick, "checks": {}}
    started = time.perf_counter()
    for name, check, correctness in CHECKS:
        if args.only and name not in args.only:
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        entry = {"correctness": correctness}
        try:
            with torch.set_grad_enabled(name == "fsdp_save_load"):
                ok, details = check(args.device, args.quick)
            entry.update(status="passed" if ok else "failed", details=details)
        except Skip as reason:
            entry.update(status="skipped", reason=str(reason))
        except Exception as error:  # recorded; the other checks still run
            entry.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        entry["seconds"] = time.perf_counter() - t0
        report["checks"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']:.1f} s)"
              + (f" {entry.get('error') or entry.get('reason')}" if entry["status"] in ("error", "skipped") else ""),
              flush=True)
        report["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")  # after every check
    failed = [n for n, e in report["checks"].items() if e["correctness"] and e["status"] in ("failed", "error")]
    report["failed"] = failed
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"[gpu_check] wrote {path}; {len(failed)} correctness check(s) failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
