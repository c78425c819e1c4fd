"""A tiny Llama-style causal LM with a byte-level BPE tokenizer trained on the fly.

No model hub is reachable here, so tests and the demo build their base model locally: real
weights and a real tokenizer, saved with ``save_pretrained`` like any hub checkpoint, small
enough (hidden 64, 2 layers, vocab ~512, ~0.1 M parameters) that 20 training steps take about
a second on CPU. ``chat=True`` gives its tokenizer a small chat template (role tokens,
``<|end|>`` closing each turn, ``{% generation %}`` markers around the assistant's), so it
trains and drafts in chat format like an instruct model; without, it is a plain base model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

#: Each turn is ``<|role|>content<|end|>``; the assistant turn, its ``<|end|>`` included,
#: inside generation markers (what TRL's ``assistant_only_loss`` masks by).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: A little English so the tokenizer learns merges even when no texts are given.
_DEFAULT_TEXTS = [
    "Write a short poem about the sea.",
    "The sea is wide and the waves are slow.",
    "Explain photosynthesis in one sentence.",
    "Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Translate 'good morning' into French.",
    "Bonjour.",
    "List three prime numbers.",
    "Two, three and five.",
]


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] = (),
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
    chat: bool = False,
) -> Path:
    """Train a tokenizer on ``texts``, initialise a Llama model, save both to ``out_dir``
    (the tokenizer with :data:`CHAT_TEMPLATE` when ``chat``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [t for t in texts if t] or _DEFAULT_TEXTS

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS.values(), *(CHAT_TOKENS if chat else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=max_position_embeddings,
    )
    if chat:
        fast.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if chat:  # generation stops at the end of the assistant's turn too
        model.generation_config.eos_token_id = [fast.eos_token_id, fast.convert_tokens_to_ids("<|end|>")]
    model.save_pretrained(out)
    return out
