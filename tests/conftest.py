"""Shared test fixtures: a tiny random Qwen3 target with a tiny word-level tokenizer.

Everything is built in code (no downloads), so tests run offline in seconds.
"""

from __future__ import annotations

import pytest
import torch

TINY_WORDS = [
    "the", "a", "is", "of", "and", "to", "in", "what", "how", "many", "write", "code", "python", "sum",
    "number", "answer", "question", "list", "please", "step", "by", "reason", "final", "two", "three",
]
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TINY_VOCAB_SIZE = 128

TINY_CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = None):
    """A whitespace word-level fast tokenizer with 128 ids that prepends ``<bos>``.

    Ids 0-5 are ``<pad> <bos> <eos> <unk> <|user|> <|assistant|>``, then a few
    English words, then ``w0``, ``w1``, ... up to the vocabulary size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + TINY_WORDS
    words += [f"w{i}" for i in range(TINY_VOCAB_SIZE - len(words))]
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word pieces with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(seed: int = 0):
    """A random 2-layer Qwen3 causal LM over the tiny vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def save_tiny_target(folder, chat_template: str | None = None, seed: int = 0):
    """Save the tiny model and tokenizer to ``folder`` (a target usable by ``load_target``)."""
    build_tiny_model(seed).save_pretrained(folder)
    build_tiny_tokenizer(chat_template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """Folder with a tiny Qwen3 target whose tokenizer has no chat template (like a base model)."""
    return save_tiny_target(tmp_path_factory.mktemp("tiny_target"))


@pytest.fixture(scope="session")
def tiny_chat_target_dir(tmp_path_factory):
    """Folder with a tiny Qwen3 target whose tokenizer has a chat template."""
    return save_tiny_target(tmp_path_factory.mktemp("tiny_chat_target"), chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded; with two threads on a busy 2-core machine the
    thread hand-offs cost more than the arithmetic (seen: 10-100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _private_latency_cache(tmp_path_factory):
    """Latency profiles measured by tests stay in a folder of this run: generate's "auto" settings read the
    cache, so a profile left by another run (or by the user) must not change what a test decodes."""
    import os

    previous = os.environ.get("HF_DSPARK_CACHE")
    os.environ["HF_DSPARK_CACHE"] = str(tmp_path_factory.mktemp("hf_dspark_cache"))
    yield
    if previous is None:
        os.environ.pop("HF_DSPARK_CACHE", None)
    else:
        os.environ["HF_DSPARK_CACHE"] = previous


def pytest_report_header(config):
    """Which releases this run tests (CI runs the suite on two transformers releases)."""
    import transformers

    return f"hf-dspark tests on transformers {transformers.__version__}, torch {torch.__version__}"
