"""Error hierarchy: catch ``HfDSparkError`` for anything this library raises on purpose.

Every class also subclasses the builtin it replaces (``ValueError``, ``RuntimeError``), so existing
``except ValueError`` code keeps working. This file ships as remote code next to drafter
checkpoints (it imports nothing), so the remote-code modeling and configuration files raise the
same classes; docs/troubleshooting.md has one section per class.
"""


class HfDSparkError(Exception):
    """Base class of every error hf-dspark raises deliberately."""


class DSparkConfigError(HfDSparkError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class DraftTargetMismatchError(HfDSparkError, ValueError):
    """A drafter was built for a different target than the one it is used with."""


class CheckpointError(HfDSparkError, ValueError):
    """A checkpoint's tensors do not match its config, or a cache shard is corrupt/mismatched."""


class CorruptFileError(CheckpointError):
    """A file's bytes do not match the sha256 recorded for it (cache shard, drafter weights), or it cannot be parsed."""


class DataError(HfDSparkError, ValueError):
    """Input data (prompts, regenerated answers, caches) is missing or unusable."""


class TargetLoadError(HfDSparkError, RuntimeError):
    """A target model could not be loaded; the message says why and what to do."""


class DraftNotFoundError(HfDSparkError, ValueError):
    """No drafter could be resolved for ``--draft``; the message says how to get one."""


class LatencyProfileError(HfDSparkError, ValueError):
    """A latency profile file is malformed, or a profile cannot answer a query."""


class RegenerationServerError(HfDSparkError, RuntimeError):
    """The OpenAI-compatible server failed or kept failing after all retries."""


class UnsupportedTransformersError(HfDSparkError, RuntimeError):
    """The installed transformers version does not have the internals hf-dspark hooks."""


class DevicePlacementError(HfDSparkError, ValueError):
    """A target or drafter is placed where it cannot run (weights on the meta device, a split target where
    one device is needed); the message names the fix."""


class OutputFolderError(HfDSparkError, FileExistsError, ValueError):
    """An ``--output`` would overwrite or delete something the command did not write (an input, another
    command's output, a file of yours). A ``FileExistsError`` for ``except OSError`` code and a
    ``ValueError`` like the other refusals of a bad argument."""


class EngineRequestError(HfDSparkError, ValueError):
    """A request given to the batched engine is unusable (empty, non-integer or out-of-vocabulary ids,
    bad sampling settings); it is refused before it enters the batch."""


class HubError(HfDSparkError, RuntimeError):
    """The Hugging Face Hub could not be reached or refused a request (upload, repository creation)."""


class UnsupportedGenerationError(HfDSparkError, ValueError):
    """A ``generate(assistant_model=drafter)`` call DSpark cannot run exactly (a cache reused from an earlier
    call, a target the installed transformers cannot verify); the message names what to do instead."""


class LosslessnessError(HfDSparkError, RuntimeError):
    """Speculative output differed from plain ``generate`` where it must be equal (fp32 greedy, or away from a
    bf16 near-tie): a bug in hf-dspark, never a setting to change. Benchmarks check every output and raise it."""


__all__ = [
    "HfDSparkError",
    "DSparkConfigError",
    "DraftTargetMismatchError",
    "CheckpointError",
    "CorruptFileError",
    "DataError",
    "TargetLoadError",
    "DraftNotFoundError",
    "LatencyProfileError",
    "RegenerationServerError",
    "UnsupportedTransformersError",
    "DevicePlacementError",
    "OutputFolderError",
    "EngineRequestError",
    "HubError",
    "UnsupportedGenerationError",
    "LosslessnessError",
]
