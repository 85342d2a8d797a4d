"""Expected acceptance of drafters under sampling, teacher forced on answers the target wrote.

    python benchmarks/probe_sampling_acceptance.py --target gemma-3-270m \
        --data work_data/gemma_data/holdout.jsonl --drafts DRAFT_DIR [DRAFT_DIR ...] \
        [--temperature 1.0 --top-k 64 --top-p 0.95] [--draft-temperatures 0.8 1.0 1.2] [--anchors 64]

Reads ``prepare-data`` rows (``input_ids`` + ``loss_mask``), runs the target once per row to get its
next-token distributions (top-k, as the feature cache stores them) and each drafter over anchor blocks
of the same row, then prints per block position the mean of ``sum_x min(p(x), q(x))``: the chance that
speculative sampling accepts the drafted token, with ``p`` and ``q`` both warped by the sampling
settings (temperature, top-k, top-p). ``tau`` is ``1 + sum_k prod_{j<=k} acceptance_j`` averaged over
blocks. The drafted prefix is the true answer (teacher forcing), so this is an indication of how a
drafter would do under sampling, cheaper and less noisy than sampled generation, not a replacement
for ``hf-dspark eval``. ``--draft-temperatures`` rescales the draft logits before warping, to see
whether a sharper or flatter proposal would be accepted more often.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModel
from transformers.generation.logits_process import TopPLogitsWarper

from hf_dspark.targets import load_target
from hf_dspark.trainer.feature_cache import target_features


def warp_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities of ``logits`` ([..., k], already the top-k) after the top-p warper."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if top_p < 1.0:
        flat = TopPLogitsWarper(top_p)(None, flat)
    return torch.softmax(flat, dim=-1).view_as(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="gemma-3-270m")
    parser.add_argument("--data", required=True, help="prepare-data JSONL (rows with input_ids and loss_mask).")
    parser.add_argument("--drafts", nargs="+", required=True)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--draft-temperatures", type=float, nargs="+", default=[1.0])
    parser.add_argument("--anchors", type=int, default=64, help="Anchor blocks per row (sampled, seeded).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.top_k <= 0:
        parser.error("--top-k must be positive: the target side keeps only its top-k distribution")
    torch.set_num_threads(args.threads)

    target, _ = load_target(args.target)
    with open(args.data, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()][: args.max_rows]
    first = AutoModel.from_pretrained(args.drafts[0], trust_remote_code=True)
    layers = list(first.config.target_layer_ids)
    features = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        feats = target_features(target, ids, None, layers, args.top_k)
        features.append((ids, torch.tensor([row["loss_mask"]]), feats))
    print(f"{len(features)} rows, target features from layers {layers}", flush=True)

    for path in args.drafts:
        draft = AutoModel.from_pretrained(path, trust_remote_code=True).float().eval()
        draft.bind_target(target)
        if list(draft.config.target_layer_ids) != layers:
            raise SystemExit(f"{path} reads target layers {draft.config.target_layer_ids}, not {layers}; "
                             "probe drafters of one layer set per run.")
        K = draft.config.block_size
        t2d = draft.target_to_draft_table()
        sums = {t: torch.zeros(K) for t in args.draft_temperatures}
        taus = {t: [] for t in args.draft_temperatures}
        counts = torch.zeros(K)
        with torch.no_grad():
            for ids, mask, feats in features:
                out = draft(input_ids=ids, target_hidden_states=feats["hidden_states"].float(), loss_mask=mask,
                            num_anchors=args.anchors, generator=torch.Generator().manual_seed(0))
                pos = (out.anchor_positions.unsqueeze(-1) + torch.arange(K)).clamp(max=ids.shape[1] - 1)[0]
                p_ids = feats["topk_ids"][0][pos].long()
                p = warp_top_p(feats["topk_logprobs"][0][pos].float() / args.temperature, args.top_p)
                valid = out.eval_mask[0].float()
                draft_ids = t2d[p_ids] if t2d is not None else p_ids
                for t in args.draft_temperatures:
                    logits = out.draft_logits[0].float() / (args.temperature * t)
                    values, index = logits.topk(min(args.top_k, logits.shape[-1]), dim=-1)
                    q = torch.zeros_like(logits).scatter_(-1, index, warp_top_p(values, args.top_p))
                    q_at = torch.gather(q, -1, draft_ids.clamp(min=0)) * (draft_ids >= 0)
                    accept = torch.minimum(p, q_at).sum(-1) * valid
                    sums[t] += accept.sum(0)
                    taus[t].append(1 + (accept.cumprod(-1) * valid).sum(-1)[valid[:, 0] > 0])
                counts += valid.sum(0)
        for t in args.draft_temperatures:
            acceptance = " ".join(f"{x:.2f}" for x in (sums[t] / counts.clamp(min=1)).tolist())
            print(f"{path}  draft temperature {t:g}: tau {torch.cat(taus[t]).mean():.3f}  "
                  f"acceptance per position {acceptance}", flush=True)


if __name__ == "__main__":
    main()
