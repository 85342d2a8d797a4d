"""Train a DSpark drafter end to end on a tiny random target, in under a minute on a laptop CPU.

    python examples/train_tiny_drafter.py [WORK_DIR]

Steps (the same commands work for a real target such as ``gemma-3-270m``):

1. build a tiny random Qwen3 target and a word-level tokenizer, save them to ``WORK_DIR/target``;
2. let the target answer random prompts and write ``WORK_DIR/data/train.jsonl`` in the format of
   ``hf-dspark prepare-data`` (for a real target, run ``hf-dspark prepare-data`` instead);
3. ``hf-dspark build-cache``: one target forward per sequence -> hidden states + top-k distribution;
4. ``hf-dspark train``: train the drafter, save it to ``WORK_DIR/drafter``;
5. reload it and print expected acceptance length (tau) before and after training.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from hf_dspark import DSparkDraftModel
from hf_dspark.cli import main as hf_dspark
from hf_dspark.trainer.data import CachedFeatureDataset, DSparkDataCollator
from hf_dspark.trainer.dspark_trainer import gather_positions
from hf_dspark.losses import dspark_loss

VOCAB_SIZE, PAD_ID, BOS_ID, EOS_ID = 128, 0, 1, 2


def make_target(folder: Path, seed: int = 0):
    """A 2-layer random Qwen3 whose next-token distributions are peaked (so there is something to learn)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=256,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # random LMs are near uniform; sharpen them
    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB_SIZE - 4)]
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def write_regenerated_data(model, folder: Path, num_rows: int = 48, answer_tokens: int = 40, seed: int = 0) -> None:
    """Rows in the ``prepare-data`` format: the target samples an answer to a random prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(4, VOCAB_SIZE, (num_rows, 6), generator=gen)
    prompts[:, 0] = BOS_ID
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             max_new_tokens=answer_tokens, min_new_tokens=answer_tokens, pad_token_id=PAD_ID)
    with open(folder / "train.jsonl", "w") as handle:
        for row, ids in enumerate(out.tolist()):
            keep = 6 + 10 + row % (answer_tokens - 10)  # varied lengths
            ids = ids[:keep]
            handle.write(json.dumps({
                "id": f"row{row}", "prompt": "", "input_ids": ids, "loss_mask": [0] * 6 + [1] * (keep - 6),
                "num_prompt_tokens": 6, "num_answer_tokens": keep - 6, "answer": "",
            }) + "\n")


@torch.no_grad()
def expected_tau(draft: DSparkDraftModel, cache_dir: Path, num_anchors: int = 32, seed: int = 0) -> float:
    """Expected acceptance length of ``draft`` on the cached sequences (fixed anchors)."""
    dataset = CachedFeatureDataset(cache_dir)
    batch = DSparkDataCollator()([dataset[i] for i in range(len(dataset))])
    out = draft(batch["input_ids"], batch["target_hidden_states"], batch["loss_mask"], num_anchors=num_anchors,
                generator=torch.Generator().manual_seed(seed))
    positions = out.anchor_positions.unsqueeze(-1) + torch.arange(draft.config.block_size)
    losses = dspark_loss(out.draft_logits, out.confidence_logits, out.target_ids, out.eval_mask,
                         out.block_keep_mask, target_topk_ids=gather_positions(batch["target_topk_ids"], positions),
                         target_topk_logprobs=gather_positions(batch["target_topk_logprobs"], positions),
                         d2t=draft.draft_to_target, t2d=draft.target_to_draft_table())
    return float(losses.expected_tau)


def main(work_dir: str | Path, max_steps: int = 60) -> dict:
    work = Path(work_dir)
    target = make_target(work / "target")
    write_regenerated_data(target, work / "data")
    hf_dspark(["build-cache", "--target", str(work / "target"), "--data", str(work / "data"),
               "--output", str(work / "cache"), "--target-layer-ids", "0", "1", "--target-topk", "16",
               "--no-progress"])
    # A fresh drafter saved first, so that "before" and "after" can be compared on the same data.
    initial = DSparkDraftModel.from_target(target, num_hidden_layers=1, block_size=5, markov_rank=16,
                                           target_layer_ids=[0, 1])
    initial.save_pretrained(work / "initial_drafter")
    hf_dspark(["train", "--target", str(work / "target"), "--cache", str(work / "cache"),
               "--output", str(work / "drafter"), "--init-draft", str(work / "initial_drafter"),
               "--max_steps", str(max_steps), "--learning_rate", "3e-3", "--num_anchors", "16",
               "--per_device_train_batch_size", "8", "--logging_steps", "10", "--save_steps", str(max_steps),
               "--disable_tqdm", "true", "--threads", "1"])
    trained = DSparkDraftModel.from_pretrained(work / "drafter").bind_target(target)
    before = expected_tau(initial, work / "cache")
    after = expected_tau(trained, work / "cache")
    summary = json.loads((work / "drafter" / "training_summary.json").read_text())
    print(f"expected tau on the training data: {before:.3f} before, {after:.3f} after "
          f"{summary['steps']} steps ({summary['tokens_per_second']} tokens/s)")
    return {"tau_before": before, "tau_after": after, "summary": summary}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(tmp)
