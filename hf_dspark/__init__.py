"""hf-dspark: DSpark speculative decoding for Hugging Face transformers.

Importing the package registers ``DSparkConfig`` / ``DSparkDraftModel`` with ``AutoConfig`` /
``AutoModel`` and installs the ``generate(assistant_model=...)`` hook for DSpark drafters (the one
documented runtime patch; see :mod:`hf_dspark.models.dspark.generate_hook_dspark`, "Who installs the hook").
The layers and the data flow are mapped in docs/design.md.
"""

from transformers import AutoConfig, AutoModel

from hf_dspark import errors
from hf_dspark.checkpoints.loading import load_drafter
from hf_dspark.decoding.batched import BatchedSpeculativeGenerator
from hf_dspark.decoding.latency import LatencyProfile, cached_latency_table, profile_latency
from hf_dspark.models.dspark.generation_dspark import LATENCY_SOURCES
from hf_dspark.errors import (
    CheckpointError,
    CorruptFileError,
    DataError,
    DevicePlacementError,
    DraftNotFoundError,
    DraftTargetMismatchError,
    DSparkConfigError,
    EngineRequestError,
    HfDSparkError,
    HubError,
    LatencyProfileError,
    LosslessnessError,
    OutputFolderError,
    RegenerationServerError,
    TargetLoadError,
    UnsupportedGenerationError,
    UnsupportedTransformersError,
)
from hf_dspark.models.dspark import (
    DSparkCandidateGenerator,
    DSparkConfig,
    DSparkDraftCache,
    DSparkDraftModel,
    DSparkGenerationConfig,
    DSparkTrainingOutput,
    FusedTopKTopPWarper,
    fuse_top_k_top_p,
    install_generate_hook,
    sample_anchor_positions,
)

__version__ = "0.1.0"

AutoConfig.register("dspark", DSparkConfig, exist_ok=True)
AutoModel.register(DSparkConfig, DSparkDraftModel, exist_ok=True)
install_generate_hook()
# generate(assistant_model=drafter) with verification_policy / ngram_lookup_tokens "auto" reads this machine's
# cached latency profile of the target when the drafter carries no cost curve for its device and dtype.
if cached_latency_table not in LATENCY_SOURCES:
    LATENCY_SOURCES.append(cached_latency_table)

__all__ = [
    "DSparkConfig",
    "DSparkDraftModel",
    "load_drafter",
    "DSparkDraftCache",
    "DSparkGenerationConfig",
    "DSparkTrainingOutput",
    "sample_anchor_positions",
    "DSparkCandidateGenerator",
    "BatchedSpeculativeGenerator",
    "install_generate_hook",
    "FusedTopKTopPWarper",
    "fuse_top_k_top_p",
    "profile_latency",
    "LatencyProfile",
    *errors.__all__,
    "__version__",
]
