"""Turning a prompt text into the token ids the target sees: raw text, or one user message rendered by
the tokenizer's chat template, as a drafter's ``config.prompt_chat_template`` records it was trained."""

from __future__ import annotations

from hf_dspark.errors import DataError

__all__ = ["encode_prompt", "has_chat_template", "render_prompt_text", "resolve_chat_mode"]


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat_mode(tokenizer, use_chat_template: str | bool = "auto", trained_with: bool | None = None) -> bool:
    """Decide whether prompts are wrapped in the chat template.

    ``"auto"`` follows ``trained_with`` (a drafter's ``config.prompt_chat_template``: how its
    training prompts were encoded) when known and possible, else uses the template when the
    tokenizer has one (base models usually do not); ``True`` requires one; ``False`` always uses
    the raw prompt text.
    """
    if isinstance(use_chat_template, str):
        mode = use_chat_template.lower()
        if mode in ("auto",):
            if trained_with is not None and (not trained_with or has_chat_template(tokenizer)):
                return bool(trained_with)
            return has_chat_template(tokenizer)
        if mode in ("yes", "true", "1"):
            use_chat_template = True
        elif mode in ("no", "false", "0"):
            use_chat_template = False
        else:
            raise DataError(f"use_chat_template must be 'auto', 'yes' or 'no', got {use_chat_template!r}.")
    if use_chat_template and not has_chat_template(tokenizer):
        raise DataError(
            "A chat template was requested but the target's tokenizer has none (a base model?). "
            "Use --chat-template auto/no to feed the raw prompt text, or set tokenizer.chat_template."
        )
    return bool(use_chat_template)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a prompt as the target sees it.

    With ``chat`` the text becomes one user message rendered by the chat template
    with the generation prompt appended; otherwise the raw text is tokenized with
    the tokenizer's special tokens (e.g. Gemma's BOS).
    """
    if chat:
        return list(tokenizer(render_prompt_text(tokenizer, text, chat), add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def render_prompt_text(tokenizer, text: str, chat: bool) -> str:
    """The prompt as a string: the chat template's rendering of one user message (with the generation
    prompt) when ``chat``, else ``text`` itself. This is what a completions server is sent."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text
