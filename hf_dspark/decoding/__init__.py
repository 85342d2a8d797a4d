"""Decoding beyond one ``generate`` call: verification, confidence calibration, scheduling and the batched engine.

- :mod:`~hf_dspark.decoding.verification`: the lossless accept/reject rule for a drafted block;
- :mod:`~hf_dspark.decoding.calibration`: Sequential Temperature Scaling of the confidence head;
- :mod:`~hf_dspark.decoding.latency`: the target's measured step-cost curve (latency profiles);
- :mod:`~hf_dspark.decoding.scheduling`: the paper's Algorithm 1 and its asynchronous variant;
- :mod:`~hf_dspark.decoding.round_cost`, :mod:`~hf_dspark.decoding.round_plan`: what one batched round
  costs, and the per-round plan (who drafts, how many tokens each request verifies);
- :mod:`~hf_dspark.decoding.batched` (the round), :mod:`~hf_dspark.decoding.admission` (requests in and
  out), :mod:`~hf_dspark.decoding.batched_drafting` (the drafter's call),
  :mod:`~hf_dspark.decoding.target_pass` (the target's pass, verification, rollback),
  :mod:`~hf_dspark.decoding.ragged`, :mod:`~hf_dspark.decoding.batch_requests`,
  :mod:`~hf_dspark.decoding.engine_config`: the continuous-batching engine, its ragged KV caches and
  what it reads from its ``DSparkGenerationConfig``.
- :mod:`~hf_dspark.decoding.oracle`: the engine verifying exactly what the target accepts (greedy, given its
  output): the ceiling of every scheduler, for measurement.
"""

from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.decoding.latency import LatencyProfile, profile_latency
from hf_dspark.decoding.oracle import OraclePolicy  # registers the "oracle" verification policy

__all__ = ["BatchedSpeculativeGenerator", "LatencyProfile", "OraclePolicy", "profile_latency"]
