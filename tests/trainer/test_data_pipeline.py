"""Tests of prompt loading, answer regeneration and the ``prepare-data`` command."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from hf_dspark.data import encode_prompt, holdout_split, load_prompts, prompt_id, resolve_chat_mode
from hf_dspark.errors import DataError
from hf_dspark.trainer.regenerate import read_finished, regenerate_in_process, regenerate_openai

from _fixtures import write_jsonl
from _models import EOS_ID, TINY_CHAT_TEMPLATE, build_tiny_model, build_tiny_tokenizer

PROMPTS = [
    "what is the sum of two and three",
    "write python code to sum a list",
    "how many w1 w2 w3 in the list",
    "please reason step by step",
    "the answer is a number",
    "w4 w5 w6 w7 w8 w9 w10 w11 w12 w13",
    "question of the code",
    "w20",
    "final answer please",
    "list of three w30 w31",
]


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"turns": [text]} for text in PROMPTS])


@pytest.fixture(scope="module")
def model():
    return build_tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- prompts


def test_load_prompts_ids_dedupe_and_order(tmp_path, prompts_file):
    other = write_jsonl(tmp_path / "more.jsonl", [{"turns": [PROMPTS[0]]}, {"turns": ["brand new prompt"]}, {}])
    prompts = load_prompts([str(prompts_file), str(other)], shuffle=False)
    texts = [p["turns"][0] for p in prompts]
    assert texts == PROMPTS + ["brand new prompt"]  # duplicate dropped, empty row skipped
    assert prompts[0]["id"] == hashlib.sha1(PROMPTS[0].encode()).hexdigest()[:16] == prompt_id(PROMPTS[0])
    assert prompts[-1]["source"] == str(other)

    shuffled = load_prompts([str(prompts_file)], seed=3)
    assert shuffled == load_prompts([str(prompts_file)], seed=3)
    assert sorted(p["id"] for p in shuffled) == sorted(p["id"] for p in prompts[:-1])
    assert [p["id"] for p in shuffled] != [p["id"] for p in prompts[:-1]]
    assert load_prompts([str(prompts_file)], seed=3, num_prompts=4) == shuffled[:4]


def test_load_prompts_columns_json_and_parquet(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps([{"question": "what is two"}, {"question": "how many"}]))
    assert [p["turns"] for p in load_prompts([str(tmp_path / "q.json")], shuffle=False)] == [
        ["what is two"], ["how many"]]
    write_jsonl(tmp_path / "c.jsonl", [{"text_field": "a b c", "prompt": "ignored"}])
    assert load_prompts([str(tmp_path / "c.jsonl")], column="text_field")[0]["turns"] == ["a b c"]
    with pytest.raises(DataError, match="c.jsonl.*missing_col"):
        load_prompts([str(tmp_path / "c.jsonl")], column="missing_col")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["write code", "sum a list"]}), tmp_path / "p.parquet")
    assert len(load_prompts([str(tmp_path / "p.parquet")])) == 2


def test_load_prompts_errors(tmp_path, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_prompts([str(tmp_path / "empty.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        load_prompts([str(tmp_path / "nope.jsonl")])
    (tmp_path / "bad.jsonl").write_text('{"turns": ["ok"]}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl, line 2"):
        load_prompts([str(tmp_path / "bad.jsonl")])

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="(?s)some-org/some-prompts.*local prompt files"):
        load_prompts(["some-org/some-prompts"])


def test_holdout_split():
    prompts = [{"id": prompt_id(text), "turns": [text]} for text in PROMPTS]
    train, holdout = holdout_split(prompts, 0.2, seed=0)
    assert len(holdout) == 2 and len(train) == 8
    assert {p["id"] for p in train}.isdisjoint(p["id"] for p in holdout)
    assert [p for p in prompts if p in train] == train  # train keeps the input order
    assert holdout_split(list(reversed(prompts)), 0.2, seed=0)[1] == list(reversed(holdout))
    assert holdout_split(prompts, 0.0)[1] == []
    assert len(holdout_split(prompts, 0.01)[1]) == 1
    with pytest.raises(DataError):
        holdout_split(prompts, 1.5)


# --------------------------------------------------------------------------- chat template


def test_chat_mode_resolution():
    plain = build_tiny_tokenizer()
    chat = build_tiny_tokenizer(TINY_CHAT_TEMPLATE)
    assert resolve_chat_mode(plain, "auto") is False
    assert resolve_chat_mode(chat, "auto") is True
    assert resolve_chat_mode(chat, "no") is False
    with pytest.raises(DataError, match="has none"):
        resolve_chat_mode(plain, True)
    with pytest.raises(DataError, match="has none"):
        resolve_chat_mode(plain, "yes")
    # auto follows how the drafter's training prompts were encoded, when the tokenizer allows it
    assert resolve_chat_mode(chat, "auto", trained_with=False) is False
    assert resolve_chat_mode(chat, "auto", trained_with=True) is True
    assert resolve_chat_mode(plain, "auto", trained_with=True) is False  # no template to apply
    assert resolve_chat_mode(chat, "yes", trained_with=False) is True  # an explicit choice wins
    ids = encode_prompt(chat, "sum a list", chat=True)
    assert chat.convert_ids_to_tokens(ids) == ["<bos>", "<|user|>", "sum", "a", "list", "<|assistant|>"]
    assert encode_prompt(plain, "sum a list", chat=False) == [1] + plain("sum a list", add_special_tokens=False)[
        "input_ids"]


# --------------------------------------------------------------------------- in-process regeneration


def check_rows(rows, tokenizer, prompts, max_new_tokens, chat=False, server=False):
    by_id = {p["id"]: p for p in prompts}
    assert sorted(row["id"] for row in rows) == sorted(by_id)
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, by_id[row["id"]]["turns"][0], chat)
        n = row["num_prompt_tokens"]
        assert n == len(prompt_ids) and row["input_ids"][:n] == prompt_ids
        assert row["prompt"] == by_id[row["id"]]["turns"][0]
        answer = row["input_ids"][n:]
        assert len(answer) == row["num_answer_tokens"] >= 1
        assert row["loss_mask"] == [0] * n + [1] * len(answer)
        assert EOS_ID not in answer[:-1]
        if row["finish_reason"] == "eos":
            assert answer[-1] == EOS_ID
        elif not server:  # a server reports "length" itself; generate stops only at max_new_tokens
            assert len(answer) == max_new_tokens and answer[-1] != EOS_ID
        assert row["answer"] == tokenizer.decode(answer, skip_special_tokens=True)


def test_greedy_batched_regeneration_matches_single_prompt_generate(tmp_path, prompts_file, model, tokenizer):
    prompts = load_prompts([str(prompts_file)])
    out = tmp_path / "out.jsonl"
    stats = regenerate_in_process(model, tokenizer, prompts, out, batch_size=4, max_new_tokens=12, do_sample=False,
                                  show_progress=False)
    assert stats["written"] == len(PROMPTS)
    rows = read_rows(out)
    check_rows(rows, tokenizer, prompts, 12)
    for row in rows:
        n = row["num_prompt_tokens"]
        single = model.generate(torch.tensor([row["input_ids"][:n]]), max_new_tokens=12, do_sample=False,
                                pad_token_id=0, eos_token_id=EOS_ID)
        assert row["input_ids"] == single[0].tolist(), row["prompt"]


def test_sampled_regeneration_is_reproducible_and_ends_on_eos(tmp_path, prompts_file, model, tokenizer):
    prompts = load_prompts([str(prompts_file)])
    kwargs = dict(batch_size=3, max_new_tokens=48, do_sample=True, temperature=1.5, top_p=None, top_k=None,
                  seed=7, show_progress=False)
    regenerate_in_process(model, tokenizer, prompts, tmp_path / "a.jsonl", **kwargs)
    regenerate_in_process(model, tokenizer, prompts, tmp_path / "b.jsonl", **kwargs)
    rows = read_rows(tmp_path / "a.jsonl")
    assert rows == read_rows(tmp_path / "b.jsonl")
    check_rows(rows, tokenizer, prompts, 48)
    reasons = {row["finish_reason"] for row in rows}
    assert reasons == {"eos", "length"}, reasons  # both branches of the answer cut are exercised


def test_regeneration_with_chat_template(tmp_path, prompts_file, model):
    chat_tokenizer = build_tiny_tokenizer(TINY_CHAT_TEMPLATE)
    prompts = load_prompts([str(prompts_file)], num_prompts=3)
    out = tmp_path / "chat.jsonl"
    regenerate_in_process(model, chat_tokenizer, prompts, out, max_new_tokens=5, do_sample=False,
                          show_progress=False)
    rows = read_rows(out)
    check_rows(rows, chat_tokenizer, prompts, 5, chat=True)
    assert all(chat_tokenizer.convert_ids_to_tokens(r["input_ids"][r["num_prompt_tokens"] - 1]) == "<|assistant|>"
               for r in rows)
    with pytest.raises(DataError, match="chat template"):
        regenerate_in_process(model, build_tiny_tokenizer(), prompts, tmp_path / "x.jsonl", use_chat_template=True)


def test_resume_after_interruption(tmp_path, prompts_file, model, tokenizer):
    prompts = load_prompts([str(prompts_file)])
    out = tmp_path / "out.jsonl"
    kwargs = dict(batch_size=4, max_new_tokens=8, do_sample=False, show_progress=False)
    regenerate_in_process(model, tokenizer, prompts, out, **kwargs)
    full = out.read_text().splitlines(keepends=True)
    # Interrupted run: three complete rows, then half of the fourth.
    out.write_text("".join(full[:3]) + full[3][: len(full[3]) // 2])
    assert read_finished(out) == {json.loads(line)["id"] for line in full[:3]}
    assert out.read_text() == "".join(full[:3])  # the cut-off line was removed

    stats = regenerate_in_process(model, tokenizer, prompts, out, **kwargs)
    assert stats["written"] == len(PROMPTS) - 3 and stats["already_done"] == 3
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:3] == full[:3]
    assert sorted(lines) == sorted(full)  # greedy: the same rows, no duplicates
    assert regenerate_in_process(model, tokenizer, prompts, out, **kwargs)["written"] == 0

    out.write_text(full[0] + "garbage\n" + full[1])
    with pytest.raises(DataError, match="line 2"):
        read_finished(out)


def test_max_prompt_tokens_skips_long_prompts(tmp_path, prompts_file, model, tokenizer):
    prompts = load_prompts([str(prompts_file)])
    stats = regenerate_in_process(model, tokenizer, prompts, tmp_path / "o.jsonl", max_new_tokens=2,
                                  do_sample=False, max_prompt_tokens=4, show_progress=False)
    long = sum(len(encode_prompt(tokenizer, p["turns"][0], False)) > 4 for p in prompts)
    assert 0 < long < len(prompts)
    assert stats["skipped_too_long"] == long and stats["written"] == len(prompts) - long


# --------------------------------------------------------------------------- OpenAI-compatible server


class FakeServer:
    """A local OpenAI-compatible server answering every prompt with ``"w5 w6 w7"``.

    The first request gets HTTP 503 to exercise the retries.
    """

    def __init__(self):
        self.requests = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, body))
                if len(owner.requests) == 1:
                    self.send_response(503)
                    self.end_headers()
                    return
                chat = self.path.endswith("/chat/completions")
                finish = "length" if "w20" in json.dumps(body) else "stop"
                choice = {"finish_reason": finish, "index": 0}
                if chat:
                    choice["message"] = {"role": "assistant", "content": "w5 w6 w7"}
                else:
                    choice["text"] = "w5 w6 w7"
                data = json.dumps({"choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("chat", [False, True])
def test_openai_regeneration_against_fake_server(tmp_path, prompts_file, chat):
    tokenizer = build_tiny_tokenizer(TINY_CHAT_TEMPLATE if chat else None)
    prompts = load_prompts([str(prompts_file)])
    out = tmp_path / "server.jsonl"
    with FakeServer() as server:
        stats = regenerate_openai(server.url, "tiny", tokenizer, prompts, out, concurrency=3, max_retries=2,
                                  max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, retry_backoff=0.01,
                                  show_progress=False)
    assert stats["written"] == len(PROMPTS)
    paths = {path for path, _ in server.requests}
    assert paths == {"/v1/chat/completions" if chat else "/v1/completions"}
    assert len(server.requests) == len(PROMPTS) + 1  # one retried request
    body = server.requests[-1][1]
    assert body["model"] == "tiny" and body["max_tokens"] == 16
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.9, 20)
    assert ("messages" in body) == chat and ("prompt" in body) != chat
    rows = read_rows(out)
    check_rows(rows, tokenizer, prompts, 16, chat=chat, server=True)
    answer_ids = tokenizer("w5 w6 w7", add_special_tokens=False)["input_ids"]
    for row in rows:
        expected = answer_ids if row["prompt"] == "w20" else answer_ids + [EOS_ID]
        assert row["input_ids"][row["num_prompt_tokens"]:] == expected
        assert row["answer"] == "w5 w6 w7"


def test_openai_regeneration_gives_up_with_clear_error(tmp_path, prompts_file):
    from hf_dspark.trainer.regenerate import RegenerationServerError

    prompts = load_prompts([str(prompts_file)], num_prompts=1)
    with pytest.raises(RegenerationServerError, match="failed 2 times"):
        regenerate_openai("http://127.0.0.1:9", "tiny", build_tiny_tokenizer(), prompts, tmp_path / "o.jsonl",
                          max_retries=1, retry_backoff=0.01, timeout=2, show_progress=False)


# --------------------------------------------------------------------------- CLI


def test_prepare_data_cli_end_to_end_and_resume(tmp_path, prompts_file, tiny_target_dir, capsys):
    from hf_dspark.cli import main, run_command

    out = tmp_path / "data"
    base = ["prepare-data", "--target", str(tiny_target_dir), "--prompts", str(prompts_file), "--output", str(out),
            "--max-new-tokens", "6", "--batch-size", "4", "--holdout", "0.2", "--no-progress", "--threads", "1"]
    argv = base + ["--temperature", "1.0", "--top-k", "20"]
    assert main(argv) == 0
    config = json.loads((out / "data_config.json").read_text())
    assert config["status"] == "complete" and config["chat_template"] is False
    assert config["target"] == str(tiny_target_dir.resolve())
    assert config["sampling"] == {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 20}
    assert config["counts"]["train"]["rows"] == 8 and config["counts"]["holdout"]["rows"] == 2
    prompts = read_rows(out / "prompts.jsonl")
    assert sorted(p["turns"][0] for p in prompts) == sorted(PROMPTS)
    train, holdout = read_rows(out / "train.jsonl"), read_rows(out / "holdout.jsonl")
    assert {r["id"] for r in holdout} == {p["id"] for p in prompts if p["split"] == "holdout"}
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in holdout)
    check_rows(train + holdout, build_tiny_tokenizer(), prompts, 6)

    before = (out / "train.jsonl").read_text()
    assert main(argv) == 0  # rerun resumes: nothing left to do
    assert (out / "train.jsonl").read_text() == before
    capsys.readouterr()
    assert main(argv + ["--dtype", "bfloat16"]) == 0  # allowed, with a warning
    assert "dtype='float32'" in capsys.readouterr().out
    with pytest.raises(DataError, match="sampling"):
        run_command(base + ["--greedy"])


def test_prepare_data_cli_rejects_missing_chat_template(tmp_path, prompts_file, tiny_target_dir, tiny_chat_target_dir):
    from hf_dspark.cli import main, run_command

    base = ["prepare-data", "--prompts", str(prompts_file), "--max-new-tokens", "3", "--greedy", "--no-progress",
            "--num-prompts", "3", "--holdout", "0"]
    with pytest.raises(DataError, match="chat template"):
        run_command(base + ["--target", str(tiny_target_dir), "--output", str(tmp_path / "a"), "--chat-template", "yes"])
    assert main(base + ["--target", str(tiny_chat_target_dir), "--output", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "data_config.json").read_text())
    assert config["chat_template"] is True and config["counts"]["train"]["rows"] == 3


def test_fast_sampler_matches_hf_sampling_distribution():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from hf_dspark.trainer.regenerate import TopKTopPSampler

    torch.manual_seed(0)
    scores = torch.randn(2, 12) * 2
    warped = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(6)(None, TemperatureLogitsWarper(0.7)(None, scores)))
    expected = warped.softmax(-1)
    sampler = TopKTopPSampler(0.7, top_k=6, top_p=0.8, generator=torch.Generator().manual_seed(0))
    draws = 4000
    counts = torch.zeros_like(scores)
    for _ in range(draws):
        forced = sampler(None, scores)
        assert torch.isinf(forced).sum() == forced.numel() - 2  # one allowed token per row
        counts.scatter_add_(1, forced.argmax(-1, keepdim=True), torch.ones(2, 1))
    assert torch.equal(counts > 0, expected > 0)  # exactly the tokens HF could draw
    torch.testing.assert_close(counts / draws, expected, atol=0.03, rtol=0)
