"""Prompts in, token ids out: what the trainer, the commands and the evaluation share.

- :mod:`~hf_dspark.data.prompts`: prompt files (``.jsonl``/``.json``/``.parquet``, folders of them) and
  Hub datasets read into ``{"id", "turns", "source"}`` rows, deduplicated and shuffled, with a report of
  the rows skipped for want of a usable prompt; the holdout split;
- :mod:`~hf_dspark.data.encoding`: a prompt text as the token ids the target sees (raw text or the
  chat template), and the choice between the two.

Neither imports torch or transformers.
"""

from hf_dspark.data.encoding import encode_prompt, has_chat_template, render_prompt_text, resolve_chat_mode
from hf_dspark.data.prompts import (
    SkippedRows,
    expand_sources,
    holdout_split,
    load_prompts,
    prompt_id,
    prompt_text,
    row_to_turns,
    unusable_reason,
)

__all__ = [
    "SkippedRows", "encode_prompt", "expand_sources", "has_chat_template", "holdout_split", "load_prompts",
    "prompt_id", "prompt_text", "render_prompt_text", "resolve_chat_mode", "row_to_turns", "unusable_reason",
]
