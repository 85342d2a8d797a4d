"""Error hierarchy: catch ``HfDSparkError`` for anything this library raises on purpose."""


class HfDSparkError(Exception):
    """Base class of every error hf-dspark raises deliberately."""


class DSparkConfigError(HfDSparkError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class DraftTargetMismatchError(HfDSparkError, ValueError):
    """A drafter was built for a different target than the one it is used with."""


class CheckpointError(HfDSparkError, ValueError):
    """A checkpoint's tensors do not match its config, or a cache shard is corrupt/mismatched."""


class DataError(HfDSparkError, ValueError):
    """Input data (prompts, regenerated answers, caches) is missing or unusable."""


class UnsupportedTransformersError(HfDSparkError, RuntimeError):
    """The installed transformers version does not have the internals hf-dspark hooks."""
