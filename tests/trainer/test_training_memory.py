"""Training from a cache holds only what it uses of the target, and hashes the cache once.

In cache mode the drafter borrows the target's embedding and LM head and the decoder layers never
run, so ``hf-dspark train --cache`` loads those two modules alone (``load_target_parts``) and
trains exactly as with the whole target. With several processes the cache's sha256 check runs on
one process per machine and every rank gets its verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import tiny_gemma3_target
from _models import BOS_ID, PAD_ID, build_tiny_model, build_tiny_tokenizer
from safetensors.torch import load_file

from hf_dspark import DSparkDraftModel, targets
from hf_dspark.cli import run_command as cli
from hf_dspark.errors import CorruptFileError
from hf_dspark.trainer import data as cache_data
from hf_dspark.trainer import target_parts, train_cli
from hf_dspark.trainer.dspark_trainer import DSparkTrainer
from hf_dspark.trainer.target_parts import TargetParts, load_target_parts

REPO = Path(__file__).resolve().parents[2]
TRAIN_FLAGS = ["--num_anchors", "8", "--per_device_train_batch_size", "4", "--disable_tqdm", "true",
               "--threads", "1", "--report_to", "none", "--block_size", "4", "--markov_rank", "8",
               "--num_draft_layers", "1", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("training_memory")


@pytest.fixture(scope="module")
def target_dir(work):
    folder = work / "target"
    model = build_tiny_model(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked next-token distributions: something to learn
    model.save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(work, target_dir):
    """A cache of 16 target-sampled sequences over three shards."""
    target = targets.load_target(str(target_dir))[0]
    data = work / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(6, 128, (16, 5), generator=gen)
    prompts[:, 0] = BOS_ID
    torch.manual_seed(0)
    with torch.no_grad():
        out = target.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=30,
                              min_new_tokens=30, pad_token_id=PAD_ID)
    with open(data / "train.jsonl", "w") as handle:
        for row, ids in enumerate(out.tolist()):
            handle.write(json.dumps({"id": f"r{row}", "prompt": "p", "input_ids": ids, "loss_mask": [0] * 5 + [1] * 30,
                                     "num_prompt_tokens": 5, "num_answer_tokens": 30, "answer": "a"}) + "\n")
    (data / "data_config.json").write_text(json.dumps({"format_version": 1, "chat_template": False}))
    cache = work / "cache"
    assert cli(["build-cache", "--target", str(target_dir), "--data", str(data), "--output", str(cache),
                "--target-layer-ids", "0", "1", "--target-topk", "8", "--shard-tokens", "200", "--no-progress"]) == 0
    assert len(json.loads((cache / "manifest.json").read_text())["shards"]) == 3
    return cache


def train(target_dir, cache, output, *extra, monkeypatch=None):
    """``hf-dspark train`` on the cache; returns the DSparkTrainer it built."""
    built = []

    class Recording(DSparkTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_cli, "DSparkTrainer", Recording)
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    argv = ["--target", str(target_dir), "--cache", str(cache), "--output", str(output), *TRAIN_FLAGS, *map(str, extra)]
    assert train_cli.run(parser.parse_args(argv)) == 0
    (trainer,) = built
    return trainer


def test_cache_mode_loads_and_moves_only_the_embedding_and_lm_head(work, target_dir, cache_dir, monkeypatch):
    def no_full_load(*args, **kwargs):
        raise AssertionError("cache-mode training loaded the whole target")

    monkeypatch.setattr(targets, "load_target", no_full_load)
    trainer = train(target_dir, cache_dir, work / "parts_run", "--max_steps", "2", monkeypatch=monkeypatch)
    part = trainer.target_model
    assert isinstance(part, TargetParts)
    names = {name for name, _ in part.named_parameters()}
    assert names == {"embed_tokens.weight", "lm_head.weight"}  # no decoder layer, no final norm
    assert not any("layers" in name for name, _ in part.named_modules())
    assert sum(p.numel() for p in part.parameters()) == 2 * 128 * 32  # vocabulary x hidden, twice (untied)
    assert {p.dtype for p in part.parameters()} == {torch.float32}  # the default on a CPU
    assert not any(p.requires_grad for p in part.parameters())
    # the drafter borrows exactly these modules, with the checkpoint's values
    draft = trainer.accelerator.unwrap_model(trainer.model)
    assert draft._borrowed["embed_tokens"] is part.embed_tokens and draft._borrowed["lm_head"] is part.lm_head
    saved = load_file(str(target_dir / "model.safetensors"))
    assert torch.equal(part.lm_head.weight, saved["lm_head.weight"])
    assert torch.equal(part.embed_tokens.weight, saved["model.embed_tokens.weight"])
    with pytest.raises(TypeError, match="only the target's embedding and LM head"):
        part(torch.tensor([[1, 2]]))

    trainer = train(target_dir, cache_dir, work / "parts_bf16", "--max_steps", "1", "--target-dtype", "bfloat16",
                    monkeypatch=monkeypatch)
    assert {p.dtype for p in trainer.target_model.parameters()} == {torch.bfloat16}


def test_cache_mode_trains_exactly_as_with_the_whole_target(work, target_dir, cache_dir, monkeypatch):
    """Same cache, same seed: the drafter trained beside the two borrowed modules equals, bit for bit in
    float32, the drafter trained beside the whole target (what every rank loaded before)."""
    init = work / "init_draft"
    torch.manual_seed(0)
    DSparkDraftModel.from_target(targets.load_target(str(target_dir))[0], num_hidden_layers=1, block_size=4,
                                 markov_rank=8, target_layer_ids=[0, 1]).save_pretrained(init)
    flags = ["--init-draft", init, "--max_steps", "3", "--learning_rate", "3e-3", "--seed", "7"]
    train(target_dir, cache_dir, work / "with_parts", *flags, monkeypatch=monkeypatch)

    whole = []

    def whole_target(name, dtype):
        model, tokenizer = targets.load_target(name, dtype=dtype)
        whole.append(model)
        return model, tokenizer

    monkeypatch.setattr(train_cli, "load_target_parts", whole_target)
    train(target_dir, cache_dir, work / "with_whole", *flags, monkeypatch=monkeypatch)
    assert len(whole) == 1 and len(whole[0].model.layers) == 2  # the comparison run did load the whole target
    parts, full = load_file(str(work / "with_parts" / "model.safetensors")), load_file(
        str(work / "with_whole" / "model.safetensors"))
    assert parts.keys() == full.keys()
    different = [name for name in parts if not torch.equal(parts[name], full[name])]
    assert different == []
    before = load_file(str(init / "model.safetensors"))
    unchanged = [name for name in before if torch.equal(before[name], parts[name])]
    assert unchanged == [], f"parameters that did not train: {unchanged}"
    summaries = [json.loads((work / run / "training_summary.json").read_text()) for run in ("with_parts", "with_whole")]
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 3


def _save_tied_qwen(folder):
    from transformers import Qwen3ForCausalLM

    config = build_tiny_model(1).config
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    Qwen3ForCausalLM(config).save_pretrained(folder)


@pytest.mark.parametrize("kind", ["untied_sharded", "tied", "gemma3_scaled_embedding"])
def test_target_parts_equal_the_whole_targets_modules(tmp_path, kind):
    folder = tmp_path / kind
    if kind == "untied_sharded":
        build_tiny_model(2).save_pretrained(folder, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif kind == "tied":
        _save_tied_qwen(folder)
    else:
        tiny_gemma3_target().save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    for dtype in (torch.float32, torch.bfloat16):
        part, _ = load_target_parts(str(folder), dtype)
        model, _ = targets.load_target(str(folder), dtype=dtype)
        ids = torch.tensor([[1, 7, 30, 64]])
        # Gemma's embedding multiplies by a scale held in a buffer that no checkpoint stores
        assert torch.equal(part.get_input_embeddings()(ids), model.get_input_embeddings()(ids)), (kind, dtype)
        assert torch.equal(part.get_output_embeddings().weight, model.get_output_embeddings().weight), (kind, dtype)
        tied = kind != "untied_sharded"
        assert (part.lm_head.weight is part.embed_tokens.weight) is tied
        assert len(list(part.parameters())) == (1 if tied else 2)
        assert part.config.to_dict() == model.config.to_dict()


def test_a_checkpoint_it_cannot_read_alone_is_loaded_whole_then_cut_down(tmp_path, monkeypatch):
    folder = tmp_path / "target"
    build_tiny_model(3).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(target_parts, "_checkpoint_files", lambda source: None)  # e.g. only pytorch_model.bin
    loaded = []
    real_load = targets.load_target

    def recording_load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs)[0])
        return loaded[-1], None

    monkeypatch.setattr(targets, "load_target", recording_load)
    part, _ = load_target_parts(str(folder))
    (model,) = loaded
    assert part.embed_tokens is model.get_input_embeddings() and part.lm_head is model.get_output_embeddings()
    assert {name for name, _ in part.named_parameters()} == {"embed_tokens.weight", "lm_head.weight"}


# ----------------------------------------------------------------------------- the sha256 check runs once
def _counting_sha256(monkeypatch):
    calls = []
    real = cache_data.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_data, "sha256_file", counting)
    return calls


def test_a_run_hashes_each_shard_once(work, target_dir, cache_dir, monkeypatch):
    calls = _counting_sha256(monkeypatch)
    train(target_dir, cache_dir, work / "hash_once", "--max_steps", "1", monkeypatch=monkeypatch)
    shards = [s["file"] for s in json.loads((cache_dir / "manifest.json").read_text())["shards"]]
    assert sorted(calls) == sorted(shards)


RANK_SCRIPT = """
import json, os, sys, types
from pathlib import Path
import torch.distributed as dist
from hf_dspark.trainer import data, train_cli
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
calls = []
real = data.sha256_file
data.sha256_file = lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k)
args = types.SimpleNamespace(local_process_index=rank, world_size=2)
try:
    train_cli.verify_caches_once([sys.argv[1]], args)
    error = None
except Exception as exc:
    error = [type(exc).__name__, str(exc)]
print("RESULT " + json.dumps({"rank": rank, "calls": calls, "error": error}), flush=True)
dist.destroy_process_group()
"""


def _two_ranks(cache) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(cache)], env={**env, "RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert process.returncode == 0 and lines, stderr[-2000:]
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return sorted(results, key=lambda result: result["rank"])


def test_with_two_ranks_one_hashes_and_both_get_its_verdict(work, cache_dir):
    shards = sorted(s["file"] for s in json.loads((cache_dir / "manifest.json").read_text())["shards"])
    first, second = _two_ranks(cache_dir)
    assert sorted(first["calls"]) == shards and second["calls"] == []
    assert first["error"] is None and second["error"] is None

    corrupt = work / "corrupt_cache"
    shutil.copytree(cache_dir, corrupt)
    shard = corrupt / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-50] ^= 0xFF
    shard.write_bytes(bytes(raw))
    first, second = _two_ranks(corrupt)
    assert second["calls"] == []
    for result in (first, second):
        kind, message = result["error"]
        assert kind == CorruptFileError.__name__ and "shard-00001" in message and "is corrupt" in message
    assert "found by the process that checked the cache" in second["error"][1]
