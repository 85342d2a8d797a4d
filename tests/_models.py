"""Tiny random targets and drafters built in code for modeling / decoding tests."""

from __future__ import annotations

import torch

from hf_dspark import DSparkDraftModel


def tiny_qwen3_target(seed: int = 0, vocab_size: int = 96, num_layers: int = 4, eos_token_id: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


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
    """A random 2-layer Qwen3 causal LM over the tiny tokenizer's vocabulary (``tiny_qwen3_target``)."""
    model = tiny_qwen3_target(seed, vocab_size=TINY_VOCAB_SIZE, num_layers=2, eos_token_id=EOS_ID)
    model.generation_config.bos_token_id = BOS_ID
    return model


def save_tiny_target(folder, chat_template: str | None = None, seed: int = 0):
    """Save the tiny model and tokenizer to ``folder`` (a target usable by ``load_target``)."""
    build_tiny_model(seed).save_pretrained(folder)
    build_tiny_tokenizer(chat_template).save_pretrained(folder)
    return folder


def tiny_gemma3_target(seed: int = 0, vocab_size: int = 96):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=512,
        sliding_window=8,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def tiny_gemma4_target(seed: int = 0, vocab_size: int = 96, attention_k_eq_v: bool = False):
    """A random 4-layer Gemma 4 text model (3 sliding + 1 full-attention layer, proportional RoPE,
    soft-capped logits); with ``attention_k_eq_v`` its full-attention layer has no v_proj."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(seed)
    config = Gemma4TextConfig(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=1,
        attention_k_eq_v=attention_k_eq_v,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        sliding_window=8,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Gemma4ForCausalLM(config).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    return model


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give a fresh drafter non-trivial weights (post_init zero-initialises the Markov W2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)
    return module


def tiny_drafter(target, seed: int = 0, scale: float = 0.5, **overrides) -> DSparkDraftModel:
    torch.manual_seed(seed)
    settings = dict(num_hidden_layers=1, block_size=5, markov_rank=8, target_layer_ids=[0, 2])
    settings.update(overrides)
    return randomize_(DSparkDraftModel.from_target(target, **settings), seed, scale=scale).eval()


def target_features(target, input_ids: torch.Tensor, layer_ids) -> torch.Tensor:
    with torch.no_grad():
        out = target(input_ids=input_ids, output_hidden_states=True)
    return torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)


def briefly_trained_drafter(target, prompts, steps: int = 40, seed: int = 0, new_tokens: int = 40, **overrides):
    """Train a drafter for ``steps`` Adam steps on the target's own greedy continuations of ``prompts``
    (a list of [1, L] tensors of equal length): a drafter that has seen the target's behaviour, so
    that verification sees long acceptances."""
    from hf_dspark.losses import dspark_loss

    draft = tiny_drafter(target, seed=seed, scale=0.1, **overrides).train()
    gen = torch.Generator().manual_seed(seed)
    plen = prompts[0].shape[1]
    with torch.no_grad():
        seqs = torch.cat(
            [target.generate(p, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens) for p in prompts]
        )
        out = target(seqs, output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i + 1] for i in draft.config.target_layer_ids], dim=-1)
    loss_mask = torch.ones_like(seqs)
    loss_mask[:, : plen - 1] = 0
    opt = torch.optim.Adam([p for p in draft.parameters() if p.requires_grad], lr=1e-2)
    K = draft.config.block_size
    for _ in range(steps):
        o = draft(seqs, feats, loss_mask=loss_mask, num_anchors=16, generator=gen)
        pos = (o.anchor_positions[..., None] + torch.arange(K)).clamp(max=seqs.shape[1] - 1)
        tl = torch.gather(out.logits, 1, pos.flatten(1)[..., None].expand(-1, -1, out.logits.shape[-1]))
        tl = tl.view(*pos.shape, -1)
        loss = dspark_loss(o.draft_logits, o.confidence_logits, o.target_ids, o.eval_mask, o.block_keep_mask,
                           target_logits=tl, d2t=draft.draft_to_target, t2d=draft.target_to_draft_table()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def small_vocab_pair(**draft_overrides):
    """A 6-token target and a drafter whose distribution is clearly different from the target's
    (verification policy "full"), for the chi-square tests of exact sampling."""
    target = tiny_qwen3_target(seed=7, vocab_size=6, num_layers=4, eos_token_id=None)
    target.generation_config.eos_token_id = None
    draft = tiny_drafter(target, seed=3, block_size=4, markov_rank=4, mask_token_id=5, **draft_overrides)
    with torch.no_grad():
        for p in draft.parameters():
            if p.is_floating_point():
                p.mul_(3.0)
    draft.generation_config.verification_policy = "full"
    return target, draft
