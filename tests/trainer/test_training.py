"""Training toolchain: feature cache, datasets, DSparkTrainer, ``hf-dspark train``, LoRA, resume, multi-process.

Everything runs on a tiny random Qwen3 target built here (its LM head is scaled up so that its
next-token distributions are peaked and a drafter has something to learn) and on data it
regenerated itself, written in the ``hf-dspark prepare-data`` format.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, TrainerCallback

from hf_dspark import DSparkDraftModel
from hf_dspark.cli import run_command as cli  # errors propagate (main() turns them into exit codes)
from hf_dspark.errors import CheckpointError, DataError
from hf_dspark.losses import dspark_loss
from hf_dspark.targets import load_target
from hf_dspark.trainer import train_cli
from hf_dspark.trainer.data import (
    CachedFeatureDataset,
    DSparkDataCollator,
    FeatureCaches,
    OnlineDataset,
    choose_draft_vocab,
    read_data_rows,
)
from hf_dspark.trainer.dspark_trainer import DSparkTrainer, gather_positions, load_trained_drafter
from hf_dspark.trainer.feature_cache import bytes_per_token, target_features
from hf_dspark.trainer.training_args import DSparkTrainingArguments

from _models import BOS_ID, EOS_ID, PAD_ID, build_tiny_model, build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
LAYERS = [0, 1]
TOPK = 16
# Small, fast settings shared by the training runs.
TRAIN_FLAGS = ["--num_anchors", "16", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
               "--threads", "1", "--report_to", "none"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, and much slower than that on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sharp_target(seed: int = 0):
    model = build_tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def target_dir(work):
    folder = work / "target"
    sharp_target().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def target(target_dir):
    return load_target(str(target_dir))[0]


@pytest.fixture(scope="module")
def data_dir(work, target):
    """36 rows of prompt + target-sampled answer, lengths 24..56, in the prepare-data format."""
    folder = work / "data"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(6, 128, (36, 6), generator=gen)
    prompts[:, 0] = BOS_ID
    torch.manual_seed(0)
    with torch.no_grad():
        out = target.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=50,
                              min_new_tokens=50, pad_token_id=PAD_ID)
    with open(folder / "train.jsonl", "w") as handle:
        for row, ids in enumerate(out.tolist()):
            keep = 24 + row % 33
            handle.write(json.dumps({"id": f"r{row}", "prompt": "p", "input_ids": ids[:keep],
                                     "loss_mask": [0] * 6 + [1] * (keep - 6), "num_prompt_tokens": 6,
                                     "num_answer_tokens": keep - 6, "answer": "a"}) + "\n")
    # prepare-data's record of how prompts were encoded (raw token ids here, no chat template)
    (folder / "data_config.json").write_text(json.dumps({"format_version": 1, "chat_template": False}))
    return folder


def build_cache(target_dir, data_dir, output, *extra):
    return cli(["build-cache", "--target", str(target_dir), "--data", str(data_dir), "--output", str(output),
                "--target-layer-ids", *map(str, LAYERS), "--target-topk", str(TOPK), "--shard-tokens", "600",
                "--no-progress", *map(str, extra)])


@pytest.fixture(scope="module")
def cache_dir(work, target_dir, data_dir):
    build_cache(target_dir, data_dir, work / "cache")
    return work / "cache"


@pytest.fixture(scope="module")
def init_draft(work, target):
    """A fresh drafter saved to disk, the common starting point of the training runs."""
    torch.manual_seed(0)
    draft = DSparkDraftModel.from_target(target, num_hidden_layers=1, block_size=5, markov_rank=16,
                                         target_layer_ids=LAYERS)
    draft.save_pretrained(work / "init_draft")
    return work / "init_draft"


def train(target_dir, source_flag, source, output, *extra, callbacks=None):
    argv = ["train", "--target", str(target_dir), source_flag, str(source), "--output", str(output), *TRAIN_FLAGS,
            *map(str, extra)]
    if callbacks is None:
        return cli(argv)
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return train_cli.run(parser.parse_args(argv[1:]), callbacks=callbacks)


def weights_of(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def weights(folder) -> dict[str, torch.Tensor]:
    return weights_of(Path(folder) / "model.safetensors")


def summary(folder) -> dict:
    return json.loads((Path(folder) / "training_summary.json").read_text())


@torch.no_grad()
def expected_tau(draft, dataset, seed: int = 0) -> float:
    batch = DSparkDataCollator()([dataset[i] for i in range(len(dataset))])
    out = draft(batch["input_ids"], batch["target_hidden_states"], batch["loss_mask"], num_anchors=24,
                generator=torch.Generator().manual_seed(seed))
    positions = out.anchor_positions.unsqueeze(-1) + torch.arange(draft.config.block_size)
    return float(dspark_loss(
        out.draft_logits, out.confidence_logits, out.target_ids, out.eval_mask, out.block_keep_mask,
        target_topk_ids=gather_positions(batch["target_topk_ids"], positions),
        target_topk_logprobs=gather_positions(batch["target_topk_logprobs"], positions),
        d2t=draft.draft_to_target, t2d=draft.target_to_draft_table(),
    ).expected_tau)


# ----------------------------------------------------------------------------- feature cache
def test_estimate_prints_bytes_and_builds_nothing(work, target_dir, data_dir, capsys):
    output = work / "estimate_only"
    assert build_cache(target_dir, data_dir, output, "--estimate") == 0
    printed = capsys.readouterr().out
    per_token = bytes_per_token(len(LAYERS), 32, TOPK)
    assert per_token == 2 * 2 * 32 + 5 + 6 * TOPK
    assert f"{per_token} bytes/token" in printed and "tokens" in printed and "Free disk space" in printed
    assert not output.exists()


def test_cache_holds_one_target_forward_per_sequence(cache_dir, data_dir, target):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format_version"] == 1 and manifest["topk"] == TOPK
    assert manifest["target_layer_ids"] == LAYERS and manifest["hidden_size"] == 32
    assert len(manifest["shards"]) == manifest["num_shards_planned"] >= 3
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    rows = read_data_rows(data_dir)
    dataset = CachedFeatureDataset(cache_dir)
    assert len(dataset) == len(rows) and sum(s["num_tokens"] for s in manifest["shards"]) == manifest["num_tokens"]
    on_disk = sum((cache_dir / s["file"]).stat().st_size for s in manifest["shards"])
    assert on_disk / manifest["num_tokens"] <= 2 * len(LAYERS) * 32 + 1024
    for index in (0, 17, len(rows) - 1):  # rows in different shards, built in different padded batches
        item, ids = dataset[index], torch.tensor([rows[index]["input_ids"]])
        assert item["input_ids"].tolist() == rows[index]["input_ids"]
        assert item["loss_mask"].tolist() == [bool(m) for m in rows[index]["loss_mask"]]
        ref = target_features(target, ids, torch.ones_like(ids), LAYERS, TOPK)
        torch.testing.assert_close(item["target_hidden_states"].float(), ref["hidden_states"][0].float(),
                                   atol=1e-2, rtol=1e-2)
        full = target(ids, output_hidden_states=True)
        assert item["target_topk_ids"][:, 0].tolist() == full.logits[0].argmax(-1).tolist()
        top = full.logits[0].float().log_softmax(-1).topk(TOPK, dim=-1).values
        torch.testing.assert_close(item["target_topk_logprobs"].float(), top, atol=2e-2, rtol=1e-3)
        torch.testing.assert_close(item["target_hidden_states"][:, 32:].float(),
                                   full.hidden_states[2][0].to(torch.bfloat16).float(), atol=1e-2, rtol=1e-2)


def test_build_cache_resumes_per_shard_and_refuses_other_settings(work, target_dir, data_dir, cache_dir, capsys):
    import shutil

    partial = work / "partial_cache"
    shutil.copytree(cache_dir, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    last = manifest["shards"].pop()  # as if killed while writing the last shard
    manifest["complete"] = False
    (partial / "manifest.json").write_text(json.dumps(manifest))
    (partial / last["file"]).unlink()
    with pytest.raises(CheckpointError, match="unfinished"):
        CachedFeatureDataset(partial)
    kept = {s["file"]: (partial / s["file"]).stat().st_mtime_ns for s in manifest["shards"]}
    capsys.readouterr()
    assert build_cache(target_dir, data_dir, partial) == 0
    assert f"{len(kept)} finished shard(s) verified and kept, 1 to build" in capsys.readouterr().out
    assert {f: (partial / f).stat().st_mtime_ns for f in kept} == kept
    rebuilt = json.loads((partial / "manifest.json").read_text())
    original = json.loads((cache_dir / "manifest.json").read_text())["shards"]
    assert rebuilt["complete"] and rebuilt["shards"][:-1] == original[:-1]
    # safetensors writes header metadata in hash order, so compare the rebuilt shard's tensors, not its bytes.
    rebuilt_tensors, original_tensors = weights_of(partial / last["file"]), weights_of(cache_dir / last["file"])
    assert rebuilt_tensors.keys() == original_tensors.keys()
    assert all(torch.equal(rebuilt_tensors[k], original_tensors[k]) for k in original_tensors)

    with pytest.raises(CheckpointError, match="target_layer_ids"):
        cli(["build-cache", "--target", str(target_dir), "--data", str(data_dir), "--output", str(partial),
             "--target-layer-ids", "1", "--target-topk", str(TOPK), "--shard-tokens", "600", "--no-progress"])
    with pytest.raises(DataError, match="--target-layer-ids"):
        build_cache(target_dir, data_dir, work / "bad_layers", "--target-layer-ids", "0", "5")


def test_corrupted_shard_is_detected(work, target_dir, data_dir, init_draft, cache_dir):
    import shutil

    corrupt = work / "corrupt_cache"
    shutil.copytree(cache_dir, corrupt)
    shard = corrupt / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*shard-00001"):
        CachedFeatureDataset(corrupt)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(target_dir, "--cache", corrupt, work / "corrupt_run", "--max_steps", "1")
    with pytest.raises(CheckpointError, match="corrupt"):
        build_cache(target_dir, data_dir, corrupt)  # a resumed build checks finished shards too


def test_cache_for_another_layer_set_or_target_is_refused(work, target_dir, cache_dir, init_draft):
    with pytest.raises(CheckpointError, match=r"target_layer_ids: cache \[0, 1\], requested \[1\]"):
        train(target_dir, "--cache", cache_dir, work / "other_layers", "--target_layer_ids", "1", "--max_steps", "1")
    other = work / "init_other_layers"
    torch.manual_seed(0)
    DSparkDraftModel.from_target(sharp_target(), num_hidden_layers=1, block_size=5, markov_rank=16,
                                 target_layer_ids=[1]).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"reads target layers \[1\]"):
        train(target_dir, "--cache", cache_dir, work / "other_init", "--init-draft", other, "--max_steps", "1")
    from _models import tiny_qwen3_target  # vocabulary 96, hidden 32, 4 layers

    wrong = work / "wrong_target"
    tiny_qwen3_target().save_pretrained(wrong)
    build_tiny_tokenizer().save_pretrained(wrong)
    with pytest.raises(CheckpointError, match="num_hidden_layers: cache 2, target 4; vocab_size: cache 128, target 96"):
        train(wrong, "--cache", cache_dir, work / "wrong_run", "--max_steps", "1")


# ----------------------------------------------------------------------------- training
def test_train_from_cache_end_to_end(work, target_dir, target, data_dir, cache_dir, init_draft):
    output = work / "drafter"
    start = time.perf_counter()
    assert train(target_dir, "--cache", cache_dir, output, "--init-draft", init_draft, "--max_steps", "40",
                 "--learning_rate", "3e-3", "--logging_steps", "10", "--save_steps", "20") == 0
    wall = time.perf_counter() - start
    run = summary(output)
    assert run["steps"] == 40 and run["mode"] == "cache" and run["resumed_from"] is None
    # the throughput is the tokens seen over the trainer's runtime, which is a part of this call
    assert 0 < run["train_runtime_s"] <= wall
    # 40 steps of 4 of the 36 sequences: 4 whole epochs, then 16 sequences of a 5th; padding is not counted
    lengths = sorted(len(row["input_ids"]) for row in read_data_rows(data_dir))
    assert len(lengths) == 36
    assert 4 * sum(lengths) + sum(lengths[:16]) <= run["tokens_trained_this_run"] <= 4 * sum(lengths) + sum(lengths[-16:])
    assert run["tokens_per_second"] == pytest.approx(run["tokens_trained_this_run"] / run["train_runtime_s"], rel=2e-3)
    first, final = run["first_logged_metrics"], run["final_metrics"]
    assert final["loss"] < first["loss"] and final["l1_loss"] < first["l1_loss"]
    assert {f"acceptance_{k}" for k in range(1, 6)} <= set(final) and "confidence_error" in final

    before, after = weights(init_draft), weights(output)
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"parameters that did not train: {unchanged}"
    dataset = CachedFeatureDataset(cache_dir)
    initial = DSparkDraftModel.from_pretrained(init_draft).bind_target(target)
    trained = DSparkDraftModel.from_pretrained(output).bind_target(target)
    tau_before, tau_after = expected_tau(initial, dataset), expected_tau(trained, dataset)
    assert tau_after > tau_before + 0.1, (tau_before, tau_after)

    # The final folder and the checkpoints are drafter folders with their remote code.
    assert trained.config.target_model_name == str(target_dir.resolve())
    # How the training prompts were encoded travels data_config.json -> cache manifest -> drafter config.
    assert json.loads((cache_dir / "manifest.json").read_text())["chat_template"] is False
    assert DSparkDraftModel.from_pretrained(init_draft).config.prompt_chat_template is None
    assert trained.config.prompt_chat_template is False
    for folder in (output, output / "checkpoint-20"):
        assert {"configuration_dspark.py", "modeling_dspark.py", "config.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((output / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_dspark.DSparkDraftModel"
    assert isinstance(AutoModel.from_pretrained(str(output), trust_remote_code=True), DSparkDraftModel)
    # In a process that never imports hf_dspark, the copied remote code must be enough.
    code = ("import sys; from transformers import AutoModel; m = AutoModel.from_pretrained(sys.argv[1], "
            "trust_remote_code=True); assert 'hf_dspark' not in sys.modules; print(type(m).__module__, "
            "sum(p.numel() for p in m.parameters()))")
    done = subprocess.run([sys.executable, "-c", code, str(output)], cwd=output, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    module, count = done.stdout.split()[-2:]
    assert module.startswith("transformers_modules") and int(count) == sum(p.numel() for p in trained.parameters())
    checkpoint = DSparkDraftModel.from_pretrained(output / "checkpoint-20")
    assert not torch.equal(checkpoint.fc.weight, trained.fc.weight)


def test_a_bf16_init_draft_trains_in_float32(work, target_dir, cache_dir, init_draft, caplog):
    """A drafter shipped in bf16 (as the Gemma 3 one is) trains with float32 weights: in bf16 an update below
    half a weight's rounding step is lost (and CPUs without native bf16 products run each step ~30x slower)."""
    shipped = work / "init_bf16"
    DSparkDraftModel.from_pretrained(init_draft).to(torch.bfloat16).save_pretrained(shipped)
    assert {t.dtype for t in weights(shipped).values()} == {torch.bfloat16}
    output = work / "from_bf16"
    with caplog.at_level(logging.INFO, logger="hf_dspark.trainer.train_cli"):
        assert train(target_dir, "--cache", cache_dir, output, "--init-draft", shipped, "--max_steps", "2") == 0
    trained = weights(output)
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert "holds bfloat16 weights; training them in float32" in caplog.text
    # and training moved them
    before = {name: t.float() for name, t in weights(shipped).items()}
    changed = [name for name in before if not torch.equal(before[name], trained[name])]
    assert changed, "no parameter moved"


def test_training_on_several_caches(work, target_dir, data_dir, cache_dir, init_draft):
    """New answers get their own cache and train next to the old one, without rebuilding it."""
    extra_data = work / "extra_data"
    extra_data.mkdir()
    rows = (data_dir / "train.jsonl").read_text().splitlines()[:12]
    (extra_data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (extra_data / "data_config.json").write_text((data_dir / "data_config.json").read_text())
    assert build_cache(target_dir, extra_data, work / "extra_cache") == 0
    both = FeatureCaches([cache_dir, work / "extra_cache"])
    single = CachedFeatureDataset(cache_dir)
    assert len(both) == len(single) + 12 and both.max_length() == single.max_length()
    for name, value in both[len(single) + 3].items():  # row 3 of the second cache is row 3 of the data
        assert torch.equal(value, single[3][name]), name
    assert sum(1 for _ in both.token_rows()) == len(both)

    output = work / "two_caches"
    assert cli(["train", "--target", str(target_dir), "--cache", str(cache_dir), str(work / "extra_cache"),
                "--output", str(output), "--init-draft", str(init_draft), "--max_steps", "3", *TRAIN_FLAGS]) == 0
    run = summary(output)
    assert run["steps"] == 3 and run["source"] == [str(cache_dir), str(work / "extra_cache")]
    assert DSparkDraftModel.from_pretrained(output).config.prompt_chat_template is False

    # Caches of other target features, of differently encoded prompts, or listed twice are refused.
    assert build_cache(target_dir, extra_data, work / "extra_cache_top8", "--target-topk", "8") == 0
    with pytest.raises(DataError, match=r"extra_cache_top8 has topk=8 but --cache .*cache has 16"):
        FeatureCaches([cache_dir, work / "extra_cache_top8"])
    chat = work / "extra_cache_chat"
    chat.mkdir()
    for item in (work / "extra_cache").iterdir():
        (chat / item.name).symlink_to(item)
    (chat / "manifest.json").unlink()
    manifest = json.loads((work / "extra_cache" / "manifest.json").read_text())
    (chat / "manifest.json").write_text(json.dumps(dict(manifest, chat_template=True)))
    with pytest.raises(DataError, match="caches disagree on how prompts were encoded"):
        cli(["train", "--target", str(target_dir), "--cache", str(cache_dir), str(chat), "--output",
             str(work / "mixed_chat"), "--max_steps", "1", *TRAIN_FLAGS])
    with pytest.raises(DataError, match="lists a folder twice"):
        FeatureCaches([cache_dir, cache_dir])


def test_fresh_drafter_with_reduced_vocabulary(work, target_dir, cache_dir):
    output = work / "vocab_drafter"
    assert train(target_dir, "--cache", cache_dir, output, "--max_steps", "3", "--draft_vocab_size", "100",
                 "--num_draft_layers", "2", "--block_size", "4", "--markov_rank", "8", "--markov_head_type",
                 "gated") == 0
    draft = DSparkDraftModel.from_pretrained(output)
    assert draft.config.draft_vocab_size == 100 and draft.config.num_hidden_layers == 2
    assert draft.config.block_size == 4 and draft.config.target_layer_ids == LAYERS
    d2t = draft.draft_to_target.tolist()
    assert len(d2t) == 100 and d2t == sorted(set(d2t)) and EOS_ID in d2t


def test_choose_draft_vocab_by_answer_frequency():
    rows = [{"input_ids": [5, 6, 7, 7, 7, 8, 8], "loss_mask": [0, 0, 1, 1, 1, 1, 1]},
            {"input_ids": [5, 9, 9], "loss_mask": [0, 1, 1]}]
    assert choose_draft_vocab(rows, 3, 16, always_include=[2]) == [2, 7, 8]
    assert choose_draft_vocab(rows, 4, 16) == [5, 7, 8, 9]  # then the most frequent prompt token
    assert choose_draft_vocab(rows, 6, 16) == [0, 5, 6, 7, 8, 9]  # then the other prompt tokens, then low ids
    with pytest.raises(DataError, match="draft_vocab_size=17"):
        choose_draft_vocab(rows, 17, 16)


def test_collator_right_pads_both_kinds(cache_dir, data_dir):
    cached, online = CachedFeatureDataset(cache_dir), OnlineDataset(data_dir)
    for dataset in (cached, online):
        items = [dataset[0], dataset[1]]
        batch = DSparkDataCollator(pad_token_id=PAD_ID)(items)
        lengths = [len(i["input_ids"]) for i in items]
        assert batch["input_ids"].shape == (2, max(lengths))
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert not batch["loss_mask"][0, lengths[0]:].any()
    assert batch.keys() == {"input_ids", "loss_mask", "attention_mask"}
    assert DSparkDataCollator()([cached[0]])["target_topk_logprobs"].dtype == torch.float16


def test_online_and_cached_training_give_the_same_loss(work, target, cache_dir, data_dir, init_draft):
    common = dict(num_anchors=16, report_to="none", target_topk=TOPK, target_layer_ids=LAYERS)
    draft = DSparkDraftModel.from_pretrained(init_draft)
    trainers = {}
    for online, dataset in ((False, CachedFeatureDataset(cache_dir)), (True, OnlineDataset(data_dir))):
        args = DSparkTrainingArguments(output_dir=str(work / f"same_loss_{online}"), online=online, **common)
        trainers[online] = (DSparkTrainer(copy.deepcopy(draft), target, args, train_dataset=dataset), dataset)
    results = {}
    for online, (trainer, dataset) in trainers.items():
        batch = trainer.data_collator([dataset[i] for i in (3, 4, 20, 35)])
        assert ("target_hidden_states" in batch) is not online
        trainer.model.train()  # as in Trainer.training_step
        loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        results[online] = (loss, out.anchor_positions, {k: v[-1] for k, v in trainer._metrics["train"].items()})
    (loss_c, anchors_c, metrics_c), (loss_o, anchors_o, metrics_o) = results[False], results[True]
    assert torch.equal(anchors_c, anchors_o)
    torch.testing.assert_close(loss_c, loss_o, atol=1e-5, rtol=1e-5)
    assert metrics_c.keys() == metrics_o.keys() and {"expected_tau", "acceptance_1", "l1_loss"} <= metrics_c.keys()
    for name in metrics_c:
        assert metrics_c[name] == pytest.approx(metrics_o[name], abs=1e-4), name
    # Evaluation reuses compute_loss; its metrics are logged with the eval_ prefix.
    trainer, dataset = trainers[False]
    metrics = trainer.evaluate(eval_dataset=torch.utils.data.Subset(dataset, range(8)))
    assert 1 < metrics["eval_expected_tau"] < 6 and "eval_acceptance_1" in metrics
    # eight sequences are one evaluation batch: its loss and metrics are compute_loss's on that batch, in eval
    # mode, with the anchors of the step's first evaluation call
    trainer._anchor_calls = {}
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator([dataset[i] for i in range(8)]))
    assert metrics["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    recomputed = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    for name in ("expected_tau", "l1_loss", "acceptance_1"):
        assert metrics[f"eval_{name}"] == pytest.approx(recomputed[name], abs=2e-6), name
    # The target is frozen and stays out of the optimizer.
    trainer = trainers[True][0]
    trainer.create_optimizer()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(p.requires_grad for p in target.parameters())
    assert not optimized & {id(p) for p in target.parameters()}


def test_online_training_through_the_cli(work, target_dir, data_dir):
    output = work / "online"
    assert train(target_dir, "--data", data_dir, output, "--max_steps", "4", "--target_layer_ids", "0", "1",
                 "--target_topk", "0", "--logging_steps", "2", "--block_size", "4", "--markov_rank", "8") == 0
    run = summary(output)
    assert run["mode"] == "online" and run["steps"] == 4 and run["final_metrics"]["expected_tau"] > 1
    assert DSparkDraftModel.from_pretrained(output).config.prompt_chat_template is False


def test_prompt_chat_template_is_read_from_the_data_behind_an_older_cache(tmp_path):
    import argparse

    from hf_dspark.trainer.train_cli import _prompt_chat_template

    data = tmp_path / "data"
    data.mkdir()
    (data / "data_config.json").write_text(json.dumps({"chat_template": True}))
    old_cache = argparse.Namespace(manifest={"data": str(data)})  # built before manifests carried the flag
    assert _prompt_chat_template(argparse.Namespace(cache="c", data=None), old_cache) is True
    new_cache = argparse.Namespace(manifest={"data": str(data), "chat_template": False})
    assert _prompt_chat_template(argparse.Namespace(cache="c", data=None), new_cache) is False
    assert _prompt_chat_template(argparse.Namespace(cache=None, data=str(data)), None) is True
    assert _prompt_chat_template(argparse.Namespace(cache=None, data=str(tmp_path)), None) is None  # unknown


def test_lora_trains_only_adapters_and_heads(work, target_dir, target, cache_dir, init_draft):
    output = work / "lora"
    assert train(target_dir, "--cache", cache_dir, output, "--init-draft", init_draft, "--lora", "--lora_r", "2",
                 "--max_steps", "8", "--learning_rate", "3e-3", "--save_steps", "4") == 0
    assert (output / "checkpoint-8" / "adapter_model.safetensors").is_file()
    before, after = weights(init_draft), weights(output)  # the final folder holds the merged drafter
    assert before.keys() == after.keys()
    for name in before:
        delta = (after[name] - before[name]).float()
        if name.startswith(("fc.", "hidden_norm.", "markov_head.", "confidence_head.")):
            assert delta.abs().max() > 0, f"{name} should train fully"
        elif name.endswith("_proj.weight"):  # adapted backbone linears: a nonzero update of rank <= r
            assert 0 < int(torch.linalg.matrix_rank(delta)) <= 2, name
        else:  # backbone norms have no adapter and stay frozen
            assert torch.equal(after[name], before[name]), f"{name} changed"
    DSparkDraftModel.from_pretrained(output).bind_target(target)

    unmerged = work / "lora_unmerged"
    assert train(target_dir, "--cache", cache_dir, unmerged, "--init-draft", init_draft, "--lora", "--lora_r", "2",
                 "--no_merge_lora", "--max_steps", "2") == 0
    assert (unmerged / "adapter" / "adapter_config.json").is_file() and not (unmerged / "model.safetensors").exists()
    loaded = load_trained_drafter(unmerged, target)
    delta = loaded.layers[0].self_attn.q_proj.weight - before["layers.0.self_attn.q_proj.weight"]
    assert 0 < int(torch.linalg.matrix_rank(delta.detach())) <= 2


class SimulatedKill(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SimulatedKill(f"killed after saving checkpoint-{self.step}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(work, target_dir, cache_dir, init_draft, lora):
    flags = ["--init-draft", init_draft, "--max_steps", "10", "--save_steps", "3", "--logging_steps", "5"]
    flags += ["--lora", "--lora_r", "2", "--learning_rate", "3e-3"] if lora else []
    name = "lora" if lora else "full"
    assert train(target_dir, "--cache", cache_dir, work / f"straight_{name}", *flags) == 0
    interrupted = work / f"interrupted_{name}"
    with pytest.raises(SimulatedKill):
        train(target_dir, "--cache", cache_dir, interrupted, *flags, callbacks=[KillAfterCheckpoint(6)])
    assert not (interrupted / "model.safetensors").exists() and (interrupted / "checkpoint-6").is_dir()
    assert train(target_dir, "--cache", cache_dir, interrupted, *flags) == 0  # --resume auto
    run = summary(interrupted)
    assert run["resumed_from"].endswith("checkpoint-6") and run["steps"] == 10
    straight, resumed = weights(work / f"straight_{name}"), weights(interrupted)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5, msg=name)


def test_training_arguments_and_anchor_config_are_validated(work, target_dir, cache_dir):
    out = str(work / "args")
    for field, value in (("block_size", 1), ("num_anchors", 0), ("markov_head_type", "lstm"), ("lora_r", 0),
                         ("lora_target_modules", ["markov_w1"]), ("max_seq_len", 3)):
        with pytest.raises(ValueError, match=f"DSparkTrainingArguments.{field}="):
            DSparkTrainingArguments(output_dir=out, use_lora=True, **{field: value})
    with pytest.raises(ValueError, match="num_anchors=500 exceeds the longest training sequence"):
        train(target_dir, "--cache", cache_dir, work / "anchors", "--num_anchors", "500", "--max_steps", "1")
    with pytest.raises(ValueError, match="block_size=60 does not fit"):
        train(target_dir, "--cache", cache_dir, work / "anchors", "--block_size", "60", "--max_steps", "1")
    with pytest.raises(DataError, match="--target-topk 0 is invalid for a cache"):
        cli(["build-cache", "--target", str(target_dir), "--data", str(work / "data"), "--output",
             str(work / "dense"), "--target-topk", "0"])


def test_two_process_training_with_accelerate(work, target_dir, cache_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = work / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu multi-process mode needs mpirun; --multi_gpu launches torchrun-style processes, and
    # `hf-dspark train` switches them to CPU (gloo) DDP when the machine has no accelerator.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "hf_dspark.cli", "train", "--target", str(target_dir), "--cache", str(cache_dir),
               "--output", str(output), "--max_steps", "4", "--per_device_train_batch_size", "2",
               "--logging_steps", "2", "--save_steps", "2", "--num_anchors", "8", "--disable_tqdm", "true",
               "--threads", "1"]
    # its own process group: on a timeout the ranks (the launcher's children) are killed too, not orphaned
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = summary(output)
    assert run["num_processes"] == 2 and run["steps"] == 4
    assert run["final_metrics"]["epoch"] == pytest.approx(4 * 2 * 2 / 36)  # 2 processes x 2 sequences per step
    DSparkDraftModel.from_pretrained(output)


def test_example_script_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_tiny_drafter.py", str(tmp_path)])
    runpy.run_path(str(REPO / "examples" / "train_tiny_drafter.py"), run_name="__main__")
    run = summary(tmp_path / "drafter")
    assert run["steps"] == 60 and run["final_metrics"]["loss"] < run["first_logged_metrics"]["loss"]
    assert (tmp_path / "drafter" / "model.safetensors").is_file()


def test_bf16_flag_on_a_cpu_only_machine_means_cpu_autocast(tmp_path, monkeypatch):
    """transformers refuses --bf16 without an accelerator unless use_cpu is set; the CLI sets it."""
    import argparse

    from hf_dspark.trainer import train_cli

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(["--target", "t", "--cache", "c", "--output", str(tmp_path / "o"), "--bf16"])
    training_args = train_cli.build_training_args(args)
    assert training_args.bf16 and training_args.use_cpu
    args = parser.parse_args(["--target", "t", "--cache", "c", "--output", str(tmp_path / "o")])
    assert not train_cli.build_training_args(args).use_cpu
