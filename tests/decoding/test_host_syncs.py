"""Host synchronisations per round of DSpark ``generate``, counted on CPU with tests/_sync_counter.py.

On an accelerator every value the host reads from a tensor (``item``, ``bool``, a boolean-mask index...)
stalls the device queue. hf-dspark's own code in the per-round loop reads none unless the algorithm needs
it; what remains per round is transformers' assisted decoding (measured here: 3 per greedy round, 5-6
per sampling round with this tiny model) and, when sampling on the warpers' support, two reads of
hf-dspark's (whether the k-th score ties, how many tokens were accepted). CPU-only fast paths may read values (the fused top-k/top-p
warper: 2 per call) and are gated to the CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from _models import tiny_drafter, tiny_qwen3_target
from _sync_counter import HostSyncCounter
from hf_dspark import FusedTopKTopPWarper

PROMPT = torch.tensor([[1, 5, 9, 17, 33, 40]])


def syncs_per_round(do_sample: bool, **sampling):
    target = tiny_qwen3_target(0)
    draft = tiny_drafter(target)
    torch.manual_seed(0)
    sampling.setdefault("min_new_tokens", 40)
    with HostSyncCounter() as syncs:
        target.generate(PROMPT, assistant_model=draft, max_new_tokens=40, do_sample=do_sample, **sampling)
    rounds = draft.last_generation_stats["rounds"]
    assert rounds >= 4
    return syncs, rounds


@pytest.mark.parametrize("do_sample, bound", [(False, 4), (True, 8)], ids=["greedy", "sampling"])
def test_generate_host_syncs_per_round(do_sample, bound):
    syncs, rounds = syncs_per_round(do_sample, **({"top_k": 0, "temperature": 0.8} if do_sample else {}))
    assert syncs.count("hf_dspark") == 0, syncs.by_site()
    assert syncs.total / rounds <= bound, syncs.by_site()


def test_fused_warper_reads_values_on_the_cpu_only():
    warper = FusedTopKTopPWarper(TopKLogitsWarper(8), TopPLogitsWarper(0.9))
    scores = torch.randn(2, 96)
    with HostSyncCounter() as syncs:
        cpu = warper(None, scores)
    assert syncs.total == 2  # any finite score left after top-k, and the widest tie
    reference = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(8)(None, scores))
    assert torch.equal(cpu, reference)
    # off the CPU (meta stands in for an accelerator: a value read there raises) it runs the pair itself
    with HostSyncCounter() as syncs:
        off_cpu = warper(None, scores.to("meta"))
    assert syncs.total == 0 and off_cpu.shape == scores.shape


def test_sampling_with_top_k_top_p_reads_on_the_host_only_in_the_cpu_warper():
    syncs, rounds = syncs_per_round(True, top_k=20, top_p=0.9)
    ours = {site for site in syncs.by_site() if "hf_dspark" in site}
    assert all("warpers_dspark" in site for site in ours), ours
    transformers_syncs = syncs.total - syncs.count("hf_dspark")
    assert transformers_syncs / rounds <= 8, syncs.by_site()


def test_sampling_on_the_support_reads_two_values_per_round():
    """With top-k (no min_new_tokens, whose processor is not vocabulary-local) every law is computed on its
    support: hf-dspark reads whether the k-th score ties and how many tokens were accepted, per round, on any
    device; transformers' full-vocabulary warping and draws are gone with their reads."""
    syncs, rounds = syncs_per_round(True, top_k=20, top_p=0.9, min_new_tokens=None)
    ours = syncs.count("hf_dspark.models.dspark.sampling_dspark")
    # besides, only the CPU warper of the prefill's draw (transformers' processors, once per call)
    others = {site for site in syncs.by_site() if "hf_dspark" in site and "sampling_dspark" not in site}
    assert all("warpers_dspark" in site for site in others), others
    assert 0 < ours <= 2 * rounds, syncs.by_site()
    assert syncs.total / rounds <= 5, syncs.by_site()
