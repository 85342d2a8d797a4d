"""The DSpark drafter: configuration, modeling and the ``generate`` hook.

Every module here except this one also ships as remote code beside drafter checkpoints, so that
``AutoModel.from_pretrained(repo, trust_remote_code=True)`` works without hf-dspark installed.
They import only each other (relative imports), transformers and torch; ``hf-dspark export``
copies them byte for byte (:func:`hf_dspark.checkpoints.export.write_remote_code`), and a test
fails when a shipped copy differs from this folder.
"""

from .configuration_dspark import DSparkConfig
from .generation_config_dspark import DSparkGenerationConfig
from .generation_dspark import DSparkCandidateGenerator, install_generate_hook
from .modeling_dspark import DSparkDraftCache, DSparkDraftModel, DSparkTrainingOutput, sample_anchor_positions
from .warpers_dspark import FusedTopKTopPWarper, fuse_top_k_top_p

__all__ = [
    "DSparkCandidateGenerator", "DSparkConfig", "DSparkDraftCache", "DSparkDraftModel", "DSparkGenerationConfig",
    "DSparkTrainingOutput",
    "FusedTopKTopPWarper", "fuse_top_k_top_p", "install_generate_hook", "sample_anchor_positions",
]
