"""Failure paths a user hits (issue 18): one-line errors, resumable interrupts, nothing silently
dropped or ignored.

Each test reproduces one defect on a tiny random target: an interrupted checkpoint save, a resume
with changed architecture flags, tracebacks for deliberate errors, unusable prompt rows, caches over
unfinished data, config values that failed late, misleading messages and corrupted drafter weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_dspark import errors
from hf_dspark.cli import main, run_command
from hf_dspark.errors import CheckpointError, DataError

from _fixtures import (
    REPO,
    build_cache_argv,
    ctrl_c_reaches_the_child,
    data_rows,
    last_line,
    make_data,
    train_argv,
    write_jsonl,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("failure_paths")


@pytest.fixture(scope="module")
def data_dir(work):
    return make_data(work / "data", data_rows(12))


@pytest.fixture(scope="module")
def cache_dir(work, tiny_target_dir, data_dir):
    assert run_command(build_cache_argv(tiny_target_dir, data_dir, work / "cache")) == 0
    return work / "cache"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ----------------------------------------------------------------------------- 1. interrupted checkpoint save
def test_a_checkpoint_interrupted_while_saving_is_skipped_on_resume(work, tiny_target_dir, cache_dir, monkeypatch,
                                                                     capsys):
    from hf_dspark.trainer.dspark_trainer import DSparkTrainer

    flags = ["--max_steps", "8", "--save_steps", "3"]
    assert run_command(train_argv(tiny_target_dir, cache_dir, work / "straight", *flags)) == 0
    output = work / "interrupted_save"
    save_rng_state = DSparkTrainer._save_rng_state

    def ctrl_c_while_saving(self, output_dir):  # weights and optimizer written, trainer_state.json not yet
        if self.state.global_step == 6:
            raise KeyboardInterrupt
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(DSparkTrainer, "_save_rng_state", ctrl_c_while_saving)
    assert main(train_argv(tiny_target_dir, cache_dir, output, *flags)) == 130
    monkeypatch.undo()
    assert (output / "checkpoint-6" / "model.safetensors").is_file()
    assert not (output / "checkpoint-6" / "trainer_state.json").exists()
    capsys.readouterr()

    assert main(train_argv(tiny_target_dir, cache_dir, output, *flags)) == 0  # the same command again
    err = capsys.readouterr().err
    assert "checkpoint-6" in err and "incomplete" in err
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 8
    straight, resumed = weights(work / "straight"), weights(output)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5, msg=name)
    # an explicitly named incomplete checkpoint is refused with the reason, not a FileNotFoundError
    (output / "checkpoint-9").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint-9 is incomplete.*trainer_state.json"):
        run_command(train_argv(tiny_target_dir, cache_dir, output, *flags, "--resume", output / "checkpoint-9"))


# ----------------------------------------------------------------------------- 2. resume with other flags
@pytest.mark.parametrize("field, old, new", [("block_size", 4, 5), ("markov_rank", 8, 4),
                                            ("markov_head_type", "vanilla", "gated")])
def test_resume_with_other_architecture_flags_is_refused(work, tiny_target_dir, cache_dir, field, old, new, capsys):
    output = work / "arch_run"
    flags = ["--max_steps", "3", "--save_steps", "2"]
    if not (output / "checkpoint-2").is_dir():
        assert run_command(train_argv(tiny_target_dir, cache_dir, output, *flags)) == 0
    before = weights(output)
    capsys.readouterr()
    assert main(train_argv(tiny_target_dir, cache_dir, output, *flags, f"--{field}", new)) == 2
    err = capsys.readouterr().err
    assert f"{field}={old!r} (now {new!r})" in err, err
    assert f"--{field} {old}" in err and "new --output" in err, err
    assert all(torch.equal(before[name], tensor) for name, tensor in weights(output).items())


# ----------------------------------------------------------------------------- 3. one-line errors, Ctrl-C
def test_deliberate_errors_print_one_line_and_exit_2(work, tiny_target_dir, data_dir, cache_dir, capsys):
    corrupt = work / "corrupt_cache"
    corrupt.mkdir()
    for item in cache_dir.iterdir():
        (corrupt / item.name).write_bytes(item.read_bytes())
    shard = corrupt / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad_prompts = write_jsonl(work / "bad_prompts.jsonl", ['{"turns": ["fine"]}', '{"turns": ['])
    from hf_dspark.trainer.data import CachedFeatureDataset

    with pytest.raises(errors.CorruptFileError, match="shard-00000.safetensors is corrupt"):
        CachedFeatureDataset(corrupt)
    cases = [
        (train_argv(tiny_target_dir, "/nonexistent", work / "r1", "--max_steps", "1"), "no manifest.json"),
        (train_argv(tiny_target_dir, corrupt, work / "r2", "--max_steps", "1"), "shard-00000.safetensors is corrupt"),
        (build_cache_argv(tiny_target_dir, data_dir, corrupt), "shard-00000.safetensors is corrupt"),
        (["prepare-data", "--target", str(tiny_target_dir), "--prompts", str(bad_prompts), "--output",
          str(work / "p1"), "--no-progress"], "line 2: not valid JSON"),
        (train_argv(tiny_target_dir, cache_dir, work / "r3", "--max_steps", "1", "--num_anchors", "0"),
         "DSparkTrainingArguments.num_anchors=0 is invalid"),
        (["calibrate", "--target", str(tiny_target_dir), "--draft", str(work), "--prompts", str(bad_prompts),
          "--temperature", "-1"], "--temperature must be >= 0"),
        (["profile", "--target", str(tiny_target_dir), "--max-tokens", "0"], "--max-tokens must be >= 1"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert last_line(err).startswith(f"hf-dspark {argv[0]}: error: ") and message in last_line(err), (argv, err)
        assert "Traceback" not in err


def test_real_bugs_keep_their_traceback(tiny_target_dir, data_dir, work, monkeypatch):
    from hf_dspark.trainer import feature_cache

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(feature_cache, "plan_shards", broken)
    with pytest.raises(ZeroDivisionError):
        main(build_cache_argv(tiny_target_dir, data_dir, work / "bug_cache"))


def test_ctrl_c_prints_one_line_and_exits_130(work, tiny_target_dir, cache_dir, monkeypatch, capsys):
    from hf_dspark.trainer.dspark_trainer import DSparkTrainer

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DSparkTrainer, "training_step", ctrl_c)
    capsys.readouterr()
    assert main(train_argv(tiny_target_dir, cache_dir, work / "ctrl_c", "--max_steps", "2")) == 130
    assert last_line(capsys.readouterr().err) == ("hf-dspark train: interrupted; rerun the same command to resume "
                                                  "(training continues from the latest complete checkpoint).")


# The child saves its first checkpoint, says so in a marker file and waits there for SIGINT: the parent
# interrupts a run that is certainly mid-training, however slow the machine, and never races its end.
_BLOCK_AFTER_FIRST_SAVE = """
import sys, time
from pathlib import Path
from hf_dspark.trainer.dspark_trainer import DSparkTrainer
from hf_dspark.cli import main

marker, save = Path(sys.argv[1]), DSparkTrainer._save_checkpoint

def save_then_wait(self, *args, **kwargs):
    result = save(self, *args, **kwargs)
    if not marker.exists():
        marker.write_text(str(self.state.global_step))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until SIGINT raises KeyboardInterrupt here
            time.sleep(0.01)
        sys.exit("no SIGINT within 600 s")
    return result

DSparkTrainer._save_checkpoint = save_then_wait
sys.exit(main(sys.argv[2:]))
"""


def test_sigint_during_training_then_the_same_command_finishes(work, tiny_target_dir, cache_dir):
    """The issue's reproduction: a real process, SIGINT once a checkpoint is written, then a rerun."""
    output, marker = work / "sigint", work / "sigint_saved"
    cli_args = train_argv(tiny_target_dir, cache_dir, output, "--max_steps", "6", "--save_steps", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", _BLOCK_AFTER_FIRST_SAVE, str(marker), *cli_args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=ctrl_c_reaches_the_child)
    while not marker.exists():  # an event, not a deadline: the child blocks until signalled
        if process.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    assert marker.read_text() == "2" and (output / "checkpoint-2" / "trainer_state.json").exists()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert last_line(err).startswith("hf-dspark train: interrupted; rerun the same command to resume"), err[-3000:]
    assert not (output / "training_summary.json").exists()  # interrupted, not finished
    done = subprocess.run([sys.executable, "-m", "hf_dspark.cli", *cli_args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].endswith("checkpoint-2")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed interrupt
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_training_at_the_step_end():
    """SIGINT handled inside a ``__del__`` is printed as "Exception ignored" and lost; the guard keeps it."""
    from hf_dspark.trainer.train_cli import InterruptGuard

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, and its KeyboardInterrupt is swallowed

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, even under `pytest &`
    guard = InterruptGuard()
    guard.on_step_end(None, None, None)  # nothing arrived: training goes on
    with guard:
        Finalized()  # collected at once: no KeyboardInterrupt reaches this frame
        assert guard.interrupted
        with pytest.raises(KeyboardInterrupt):
            guard.on_step_end(None, None, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process started in the background by a script
    try:
        with InterruptGuard() as ignoring:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # it keeps ignoring Ctrl-C
            ignoring.on_step_end(None, None, None)
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_missing_cache_gives_no_traceback_in_a_real_process(tiny_target_dir, work):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "hf_dspark.cli",
                           *train_argv(tiny_target_dir, "/nonexistent", work / "nocache", "--max_steps", "1")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last_line(done.stderr).startswith("hf-dspark train: error: --cache /nonexistent: no manifest.json")


# ----------------------------------------------------------------------------- 4. unusable prompt rows
UNUSABLE_ROWS = ['{"turns": ["what is two and two"]}', '{"turns": []}', '{"turns": ["write python code"]}',
                 '{"turns": [""]}', '{"turns": "a string, not a list"}', '{"turns": [3]}', '{"turns": ["what is two and two"]}']


def test_load_prompts_reports_the_rows_it_skips(tmp_path):
    from hf_dspark.data import load_prompts

    path = write_jsonl(tmp_path / "prompts.jsonl", UNUSABLE_ROWS)
    skipped = []
    assert len(load_prompts([str(path)], skipped=skipped)) == 2
    (report,) = skipped
    assert report.count == 4 and report.rows_read == 7 and report.duplicates == 1
    text = report.describe()
    for part in ("skipped 4 of 7 rows", "'turns' is an empty list (line 2)", "'turns' holds an empty string (line 4)",
                 "'turns' is not a list but a str (line 5)", "'turns' holds int values, not text (line 6)"):
        assert part in text, text
    with pytest.raises(DataError, match=r"prompts.jsonl, line 2: 'turns' is an empty list.*--strict"):
        load_prompts([str(path)], strict=True)


def test_prepare_data_and_eval_say_how_many_rows_they_skipped(tmp_path, tiny_target_dir, capsys):
    path = write_jsonl(tmp_path / "prompts.jsonl", UNUSABLE_ROWS)
    argv = ["prepare-data", "--target", str(tiny_target_dir), "--prompts", str(path), "--output", str(tmp_path / "d"),
            "--max-new-tokens", "3", "--greedy", "--holdout", "0", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Loaded 2 unique prompts from 7 rows of 1 source(s) (1 duplicate)" in out, out
    assert "skipped 4 of 7 rows" in out and "(line 2)" in out and "--strict" in out, out
    assert main(argv[:-2] + ["--output", str(tmp_path / "strict"), "--strict"]) == 2
    assert "line 2: 'turns' is an empty list" in last_line(capsys.readouterr().err)
    assert not (tmp_path / "strict").exists()

    evaluate = ["eval", "--target", str(tmp_path / "no_target"), "--draft", str(tmp_path / "no_draft"), "--prompts",
                str(path), "--no-progress"]
    assert main(evaluate) == 2  # the target does not exist; the prompts were read before
    captured = capsys.readouterr()
    assert "skipped 4 of 7 rows" in captured.out + captured.err and "(line 2)" in captured.out + captured.err
    assert main(evaluate + ["--strict"]) == 2
    assert "line 2: 'turns' is an empty list" in last_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------- 5. caches over unfinished data
def test_build_cache_refuses_unfinished_data_and_explains_grown_data(work, tiny_target_dir, capsys):
    rows = data_rows(39, seed=5)
    data = make_data(work / "growing_data", rows[:29], status="running")
    config = json.loads((data / "data_config.json").read_text())
    (data / "data_config.json").write_text(json.dumps(dict(config, num_prompts={"train": 39, "holdout": 0})))
    cache = work / "growing_cache"
    assert main(build_cache_argv(tiny_target_dir, data, cache)) == 2
    err = last_line(capsys.readouterr().err)
    assert "status 'running'" in err and "29 of 39" in err and "--allow-partial" in err, err
    assert not cache.exists()

    assert main(build_cache_argv(tiny_target_dir, data, cache, "--allow-partial")) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_sequences"] == 29 and manifest["data_status"] == "running"

    make_data(data, rows, status="complete")  # prepare-data finished: 10 more rows
    capsys.readouterr()
    assert main(build_cache_argv(tiny_target_dir, data, cache)) == 2
    err = last_line(capsys.readouterr().err)
    assert "grew" in err and "29" in err and "39" in err and "--first-row 29" in err and "--overwrite" in err, err
    assert "train --cache" in err, err

    # the first way out: the 10 new rows as a second cache, trained on next to the first one
    assert main(build_cache_argv(tiny_target_dir, data, work / "new_rows_cache", "--first-row", "29")) == 0
    assert json.loads((work / "new_rows_cache" / "manifest.json").read_text())["num_sequences"] == 10
    from hf_dspark.trainer.data import FeatureCaches

    both = FeatureCaches([cache, work / "new_rows_cache"])
    assert len(both) == 39 and torch.equal(both[29]["input_ids"], torch.tensor(rows[29]["input_ids"]))
    # the second: rebuild over every row
    assert main(build_cache_argv(tiny_target_dir, data, cache, "--overwrite")) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_sequences"] == 39 and manifest["complete"] and manifest["data_status"] == "complete"


# ----------------------------------------------------------------------------- 6. config values that failed later
@pytest.mark.parametrize("overrides, field", [
    (dict(block_size=4.5), "block_size"),
    (dict(block_size="4"), "block_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(draft_vocab_size=0), "draft_vocab_size"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(markov_rank=2.0), "markov_rank"),
    (dict(hidden_size="64"), "hidden_size"),
])
def test_config_values_fail_at_construction_naming_the_field(overrides, field):
    from hf_dspark import DSparkConfig

    with pytest.raises(ValueError, match=rf"DSparkConfig\.{field}=.* is invalid: "):
        DSparkConfig(**overrides)


def test_from_target_refuses_a_fractional_block_size_before_generate():
    from _models import tiny_qwen3_target

    from hf_dspark import DSparkDraftModel

    with pytest.raises(ValueError, match=r"DSparkConfig\.block_size=4\.5 is invalid"):
        DSparkDraftModel.from_target(tiny_qwen3_target(), block_size=4.5)


def test_generation_settings_are_checked_when_set_saved_and_loaded(tmp_path):
    from _models import tiny_drafter, tiny_qwen3_target

    from hf_dspark import DSparkDraftModel

    draft = tiny_drafter(tiny_qwen3_target())
    with pytest.raises(ValueError, match=r"generation_config\.verification_policy='bogus' is invalid"):
        draft.generation_config.verification_policy = "bogus"
    with pytest.raises(ValueError, match=r"generation_config\.confidence_threshold=5\.0 is invalid"):
        draft.generation_config.confidence_threshold = 5.0
    with pytest.raises(ValueError, match=r"generation_config\.min_draft_tokens=-1 is invalid"):
        draft.generation_config.update(min_draft_tokens=-1)
    draft.generation_config.confidence_threshold = 0.5  # valid values still go through
    draft.generation_config.__dict__["confidence_threshold"] = 5.0  # slipped past the setter: refused on save
    with pytest.raises(ValueError, match=r"confidence_threshold=5\.0"):
        draft.save_pretrained(tmp_path / "not_saved")
    draft.generation_config.__dict__["confidence_threshold"] = 0.5
    draft.save_pretrained(tmp_path / "draft")
    path = tmp_path / "draft" / "generation_config.json"
    for field, value in (("verification_policy", "bogus"), ("confidence_threshold", 5.0)):
        saved = json.loads(path.read_text())
        path.write_text(json.dumps(dict(saved, **{field: value})))  # a hand-edited file
        with pytest.raises(ValueError, match=rf"generation_config.json.*{field}={value!r} is invalid"):
            DSparkDraftModel.from_pretrained(tmp_path / "draft")
        path.write_text(json.dumps(saved))
    assert DSparkDraftModel.from_pretrained(tmp_path / "draft").generation_config.confidence_threshold == 0.5


# ----------------------------------------------------------------------------- 8. corrupted drafter weights
def flip_data_bytes(path: Path) -> None:
    """Flip one exponent byte in the data part of a safetensors file (the header stays valid)."""
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def exported(tmp_path):
    from _models import tiny_drafter, tiny_qwen3_target

    from hf_dspark.checkpoints.export import export_drafter

    draft = tiny_drafter(tiny_qwen3_target())
    draft.config.target_model_name = "org/tiny-target"
    draft.save_pretrained(tmp_path / "trained")
    return export_drafter(tmp_path / "trained", tmp_path / "export")


def test_exports_record_weight_checksums_and_loading_checks_them(exported, capsys):
    from transformers import AutoModel

    from hf_dspark import DSparkDraftModel
    from hf_dspark.models.dspark.modeling_dspark import file_sha256

    card = json.loads((exported / "dspark_card.json").read_text())
    assert card["weights_sha256"] == {"model.safetensors": file_sha256(exported / "model.safetensors")}
    DSparkDraftModel.from_pretrained(exported)
    assert main(["verify", str(exported)]) == 0
    assert "1 weight file(s) match" in capsys.readouterr().out
    assert main(["push", "--draft", str(exported), "--repo", "org/x", "--dry-run"]) == 0

    flip_data_bytes(exported / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt: its sha256"):
        DSparkDraftModel.from_pretrained(exported)
    with pytest.raises(ValueError, match=r"model.safetensors is corrupt"):
        AutoModel.from_pretrained(str(exported), trust_remote_code=True)  # the shipped remote code checks too
    capsys.readouterr()
    assert main(["verify", str(exported)]) == 2
    assert "model.safetensors is corrupt" in last_line(capsys.readouterr().err)
    assert main(["push", "--draft", str(exported), "--repo", "org/x", "--dry-run"]) == 2
    assert "model.safetensors is corrupt" in last_line(capsys.readouterr().err)


def test_verify_without_records_still_checks_the_tensors(tmp_path, capsys):
    from _models import tiny_drafter, tiny_qwen3_target

    draft = tiny_drafter(tiny_qwen3_target())
    draft.save_pretrained(tmp_path / "trained")
    assert main(["verify", str(tmp_path / "trained")]) == 0
    assert "records no sha256" in capsys.readouterr().out
    weights_path = tmp_path / "trained" / "model.safetensors"
    weights_path.write_bytes(weights_path.read_bytes()[:200])  # truncated
    assert main(["verify", str(tmp_path / "trained")]) == 2
    assert "cannot be read as safetensors" in last_line(capsys.readouterr().err)


def test_the_shipped_drafter_records_its_weight_checksum(capsys):
    from hf_dspark.models.dspark.modeling_dspark import file_sha256
    from hf_dspark.targets import shipped_draft_dir

    folder = shipped_draft_dir("gemma-3-270m")
    card = json.loads((folder / "dspark_card.json").read_text())
    assert card["weights_sha256"] == {"model.safetensors": file_sha256(folder / "model.safetensors")}
    assert main(["verify", str(folder)]) == 0


# ----------------------------------------------------------------------------- 7. misleading messages
def test_a_drafter_for_another_vocabulary_gets_our_message_before_transformers_advice():
    from _models import tiny_qwen3_target

    from _models import build_tiny_model
    from hf_dspark import DSparkDraftModel

    target = build_tiny_model()  # vocabulary 128, 2 layers
    draft = DSparkDraftModel.from_target(tiny_qwen3_target(vocab_size=96, num_layers=2), num_hidden_layers=1)
    draft._borrowed = {}  # loaded from disk: not bound to any target yet
    with pytest.raises(ValueError, match=r"vocabulary: drafter expects 96, target has 128") as caught:
        target.generate(torch.tensor([[1, 7, 8]]), assistant_model=draft, max_new_tokens=3, do_sample=False)
    assert "different tokenizers" not in str(caught.value)


def test_the_target_check_hook_is_installed_and_refuses_a_changed_internal():
    from transformers.generation.utils import GenerationMixin

    from hf_dspark.models.dspark import generate_hook_dspark

    installed = GenerationMixin._validate_generation_mode
    assert getattr(installed, "_dspark_hook", False)
    generate_hook_dspark._check_internal_signature(  # the installed transformers still has the expected signature
        installed._dspark_original, generate_hook_dspark.CHECKED_INTERNAL, generate_hook_dspark.CHECKED_INTERNAL_PARAMETERS)

    def changed(self, generation_mode, generation_config):  # a future signature
        return None

    with pytest.raises(RuntimeError, match="_validate_generation_mode but its signature changed"):
        generate_hook_dspark._check_internal_signature(
            changed, generate_hook_dspark.CHECKED_INTERNAL, generate_hook_dspark.CHECKED_INTERNAL_PARAMETERS)


def test_export_of_a_plain_model_says_it_is_not_a_dspark_drafter(tmp_path, tiny_target_dir, capsys):
    assert main(["export", "--draft", str(tiny_target_dir), "--output", str(tmp_path / "out")]) == 2
    err = last_line(capsys.readouterr().err)
    assert "not a DSpark drafter" in err and "target_model_name" not in err, err


def test_eval_with_a_missing_draft_folder_says_so(tmp_path, tiny_target_dir, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", ['{"turns": ["what is two and two"]}'])
    for draft in ("/nonexistent", str(tmp_path / "no" / "such" / "drafter")):
        assert main(["eval", "--target", str(tiny_target_dir), "--draft", draft, "--prompts", str(prompts),
                     "--no-progress", "--max-new-tokens", "4"]) == 2
        err = last_line(capsys.readouterr().err)
        assert f"{draft}: no such folder, and not a Hub id" in err and "Repo id" not in err, err


@pytest.fixture
def eval_argv(tmp_path, tiny_target_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", ['{"turns": ["what is two and two"]}'])
    return lambda draft: ["eval", "--target", str(tiny_target_dir), "--draft", str(draft), "--prompts", str(prompts),
                          "--no-progress", "--max-new-tokens", "4", "--device", "cpu"]


def test_a_drafter_for_another_target_is_reported_in_one_line(tmp_path, eval_argv, cache_dir, capsys):
    from _models import tiny_qwen3_target

    from hf_dspark import DSparkDraftModel

    other = tmp_path / "other"
    DSparkDraftModel.from_target(tiny_qwen3_target(vocab_size=96, num_layers=2), target_layer_ids=[0, 1],
                                 markov_rank=8, block_size=4).save_pretrained(other)
    target = eval_argv(other)[2]
    argvs = [eval_argv(other),
             ["calibrate", "--target", target, "--draft", str(other), "--prompts", eval_argv(other)[6],
              "--output", str(tmp_path / "calibrated")],
             train_argv(target, cache_dir, tmp_path / "init_other", "--init-draft", other, "--max_steps", "1")]
    for argv in argvs:
        assert main(argv) == 2, argv
        err = last_line(capsys.readouterr().err)
        assert err.startswith(f"hf-dspark {argv[0]}: error: ") and "vocabulary: drafter expects 96, target has 128" in err, err


def test_eval_reports_truncated_or_corrupted_drafter_weights_in_one_line(tmp_path, eval_argv, exported, capsys):
    from _models import build_tiny_model

    from hf_dspark import DSparkDraftModel

    trained = tmp_path / "truncated"
    DSparkDraftModel.from_target(build_tiny_model(), num_hidden_layers=1).save_pretrained(trained)
    path = trained / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(eval_argv(trained)) == 2
    err = last_line(capsys.readouterr().err)
    assert "model.safetensors" in err and "truncated or corrupt" in err and "SafetensorError" not in err, err

    flip_data_bytes(exported / "model.safetensors")  # an export: its sha256 record catches flipped data bytes
    assert main(eval_argv(exported)) == 2
    assert "model.safetensors is corrupt" in last_line(capsys.readouterr().err)


def test_prepare_data_with_a_bad_target_leaves_no_folder_behind(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", ['{"turns": ["what is two and two"]}'])
    output = tmp_path / "data"
    assert main(["prepare-data", "--target", str(tmp_path / "no_target"), "--prompts", str(prompts), "--output",
                 str(output), "--no-progress"]) == 2
    err = last_line(capsys.readouterr().err)
    assert "no such folder, and not a Hub id" in err and "Repo id" not in err, err
    assert not output.exists()


@pytest.mark.parametrize("command", ["bench-batch", "bench-serve"])
def test_bench_commands_check_prompt_files_before_loading_the_target(tmp_path, command, capsys, monkeypatch):
    # the target does not exist either: the prompt check must come first (before minutes of loading and profiling)
    import hf_dspark.commands.bench_batch as bench_batch

    def no_setup(*args, **kwargs):
        raise AssertionError("the target was loaded before the prompt files were checked")

    monkeypatch.setattr(bench_batch, "load_setup", no_setup)
    if command == "bench-serve":
        import hf_dspark.commands.bench_serve as bench_serve

        monkeypatch.setattr(bench_serve, "load_setup", no_setup)
    missing = tmp_path / "gsm8k.jsonl"
    assert main([command, "--target", str(tmp_path / "no_target"), "--draft", str(tmp_path / "no_draft"),
                 "--prompts", str(missing)]) == 2
    err = last_line(capsys.readouterr().err)
    assert f"Prompt file {missing} does not exist" in err, err
