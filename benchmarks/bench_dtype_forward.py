"""Is bf16 this machine's fast path? One target forward over n new tokens, fp32 vs bf16, side by side.

    python benchmarks/bench_dtype_forward.py --target gemma-3-270m [--threads 1] [--context 128] [--repeats 5]

For each dtype the target prefills a ``--context``-token cache once, then scores n = 1, 2, 4, 8, 16 new
tokens per forward (the cache cropped back after each), ``--repeats`` times; the median is printed with the
ratio to the 1-token pass. A verification pass of speculative decoding is such an n-token forward, so
where the bf16 row grows with n (no native bf16 matrix products: AVX2-only CPUs) DSpark should run in
fp32, and where it stays flat (AVX512-BF16, AMX, GPUs) in bf16. Also prints what torch reports about the
CPU. ``hf-dspark profile --dtype D`` measures the same table with the verification head layout used by
``generate`` and caches it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_dspark.targets import load_target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "threads": args.threads}
    print(json.dumps(info))
    table: dict[str, dict[int, float]] = {}
    base, _ = load_target(args.target, dtype=torch.float32)
    for name in ("float32", "bfloat16"):
        model = base if name == "float32" else base.to(torch.bfloat16)  # fp32 first: the cast is the last use
        context = torch.randint(10, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            out = model(input_ids=context, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            table[name] = {}
            for n in args.tokens:
                times = []
                for _ in range(args.repeats + 1):
                    ids = torch.randint(10, 1000, (1, n))
                    start = time.perf_counter()
                    model(input_ids=ids, past_key_values=cache, use_cache=True)
                    times.append(time.perf_counter() - start)
                    cache.crop(-n)
                table[name][n] = statistics.median(times[1:])
        one = table[name][args.tokens[0]]
        print(name, "  ".join(f"n={n}: {t * 1e3:.0f} ms ({t / one:.1f}x)" for n, t in table[name].items()), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({**info, "target": args.target, "context": args.context, "seconds": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
