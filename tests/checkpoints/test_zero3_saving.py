"""Drafters trained under DeepSpeed ZeRO stage 3 (parameters partitioned over ranks) save whole and load,
and training resumes from the checkpoint folders DeepSpeed itself writes.

Two CPU ranks run the real ``DSparkTrainer`` with a ZeRO-3 config, the way ``accelerate launch`` /
``TrainingArguments(deepspeed=...)`` runs it on GPUs. What this machine needs on top:

* ``DS_ACCELERATOR=cpu``: DeepSpeed's CPU accelerator; without oneCCL installed it uses gloo.
* DeepSpeed's shared-memory collective op is left unbuilt (gloo carries every collective): it is a C++
  extension that DeepSpeed would compile at start-up with the machine's compiler.
* accelerate finds no accelerator here and would count one process; the process state is set up first
  with the gloo backend (and the Trainer told to use it), so both ranks take part as on GPUs.
* ``stage3_gather_16bit_weights_on_model_save`` is left off (DeepSpeed's default): checkpoints then hold
  only DeepSpeed's shards (``global_stepN``), the layout resume must accept, and ``save_drafter`` must
  gather the weights itself.
"""

from __future__ import annotations

import importlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from _models import tiny_drafter, tiny_qwen3_target
from safetensors.torch import load_file

try:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
except ImportError as error:
    raise ImportError("deepspeed is missing: it is in the dev extra, run pip install -e '.[dev]'") from error

from hf_dspark import DSparkDraftModel
from hf_dspark.trainer import train_cli

STEPS = 3
ZERO3 = {
    # parameters this small would otherwise stay whole on every rank (persistence threshold 1e5 elements)
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False,
                          "stage3_param_persistence_threshold": 0},
    "zero_force_ds_cpu_optimizer": False,  # the Trainer's torch AdamW, no compiled DeepSpeed optimizer
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def _dataset() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 90, (24,), generator=generator), "loss_mask": torch.arange(24) >= 4}
            for _ in range(16)]


def _trainer(output_dir, target, seed: int = 0):
    from hf_dspark.trainer.dspark_trainer import DSparkTrainer
    from hf_dspark.trainer.training_args import DSparkTrainingArguments

    args = DSparkTrainingArguments(
        output_dir=str(output_dir), online=True, deepspeed=ZERO3, accelerator_config={"use_configured_state": True},
        max_steps=STEPS, save_steps=1, per_device_train_batch_size=2, num_anchors=4, target_layer_ids=[0, 2],
        target_topk=8, learning_rate=1e-2, report_to="none", disable_tqdm=True, logging_steps=1,
    )
    return DSparkTrainer(tiny_drafter(target, seed=seed), target, args, train_dataset=_dataset())


def _rank(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      ACCELERATE_USE_DEEPSPEED="true")
    torch.set_num_threads(1)
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    # gloo only: no C++ extension to compile (deepspeed.comm re-exports torch, so the module is taken by name)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    state = PartialState(backend="gloo")
    assert state.num_processes == world and state.distributed_type == "DEEPSPEED"
    target = tiny_qwen3_target()
    trainer = _trainer(os.path.join(folder, "straight"), target)
    trainer.train()
    engine = trainer.model_wrapped
    assert type(engine).__name__ == "DeepSpeedEngine" and trainer.is_deepspeed_enabled
    # ZeRO-3 really partitions: each rank holds half of every parameter, the module's own tensors are empty
    for name, parameter in engine.module.named_parameters():
        assert parameter.numel() == 0, name
        assert parameter.ds_tensor.numel() == -(-parameter.ds_numel // world), name
    if rank == 0:
        # what saving without gathering would write
        empty = [name for name, tensor in engine.module.state_dict().items() if tensor.numel() == 0]
        torch.save(empty, os.path.join(folder, "empty_without_gathering.pt"))
    trainer.save_drafter(os.path.join(folder, "drafter"))  # a collective: every rank calls it
    # resume a second run from the checkpoint DeepSpeed wrote after step STEPS - 1 (a new Trainer builds a new
    # Accelerator: forget the first one's state, keep the processes' group as a relaunch would set it up again).
    # Its drafter starts from other weights: only what it loads from the checkpoint can make it end as the first.
    AcceleratorState._reset_state()
    resumed = _trainer(os.path.join(folder, "resumed"), target, seed=1)
    resumed.train(resume_from_checkpoint=os.path.join(folder, "straight", f"checkpoint-{STEPS - 1}"))
    assert resumed.state.global_step == STEPS
    resumed.save_drafter(os.path.join(folder, "resumed_drafter"))


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero3")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_rank, args=(2, port, str(folder)), nprocs=2, join=True, start_method="spawn")
    return folder


def test_zero3_partitioned_drafter_is_saved_whole_and_loads(zero3_run):
    last = zero3_run / "straight" / f"checkpoint-{STEPS}"
    # the reference: DeepSpeed's own offline consolidation of the shards of the last checkpoint
    reference = get_fp32_state_dict_from_zero_checkpoint(str(last))
    initial = tiny_drafter(tiny_qwen3_target()).state_dict()
    saved = load_file(str(zero3_run / "drafter" / "model.safetensors"))
    assert set(saved) == set(initial) == set(reference)
    # without the gather, every one of them would have been saved as an empty tensor
    assert set(torch.load(zero3_run / "empty_without_gathering.pt")) == set(saved)
    for name, tensor in saved.items():
        assert tensor.shape == initial[name].shape, name
        assert torch.equal(tensor, reference[name]), name
    trained = [name for name in saved if not torch.equal(saved[name], initial[name])]
    assert trained, "training changed no weight"
    loaded = DSparkDraftModel.from_pretrained(zero3_run / "drafter")
    assert all(torch.equal(loaded.state_dict()[name], saved[name]) for name in saved)


def test_zero3_checkpoints_have_deepspeeds_layout_and_resume_continues_them(zero3_run):
    straight = zero3_run / "straight"
    kept = sorted(path.name for path in straight.glob("checkpoint-*"))
    assert kept == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]  # save_total_limit=2 rotated the others away
    for step in (STEPS - 1, STEPS):
        checkpoint = straight / f"checkpoint-{step}"
        assert (checkpoint / f"global_step{step}").is_dir()
        assert not (checkpoint / "model.safetensors").exists()  # only DeepSpeed's shards hold the weights
        assert train_cli.checkpoint_problem(checkpoint) is None
    assert train_cli._resolve_checkpoint("auto", straight) == str(straight / f"checkpoint-{STEPS}")
    # resumed from checkpoint-(STEPS-1) (weights and optimizer state), a run that started from other weights
    # ends with the weights of the uninterrupted run
    straight_weights = load_file(str(zero3_run / "drafter" / "model.safetensors"))
    resumed = load_file(str(zero3_run / "resumed_drafter" / "model.safetensors"))
    assert set(resumed) == set(straight_weights)
    for name in straight_weights:
        torch.testing.assert_close(resumed[name], straight_weights[name], atol=1e-6, rtol=1e-5, msg=name)
    # ... and that last step did change them (the resumed run trained, it did not just reload the end state)
    restart = get_fp32_state_dict_from_zero_checkpoint(str(straight / f"checkpoint-{STEPS - 1}"))
    assert set(restart) == set(resumed) and all(resumed[name].shape == restart[name].shape for name in restart)
    assert any(not torch.equal(resumed[name], restart[name]) for name in restart)
