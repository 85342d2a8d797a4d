"""Moved to :mod:`hf_dspark.data.prompts` (the commands and the evaluation read prompts too); the names
below still work from here for one release, with a ``FutureWarning``."""

from __future__ import annotations

from hf_dspark.deprecation import moved_names

_MOVED = ("CHAT_COLUMNS", "LOCAL_SUFFIXES", "TEXT_COLUMNS", "SkippedRows", "expand_sources", "holdout_split",
          "load_prompts", "prompt_id", "prompt_text", "row_to_turns", "unusable_reason")

__getattr__ = moved_names(__name__, dict.fromkeys(_MOVED, "hf_dspark.data.prompts"))
