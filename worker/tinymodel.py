"""A tiny but real Llama model made offline, for tests and the CPU demo.

No model hub is reachable here, so the project makes its own: a byte-level BPE tokenizer
trained on a few sentences and a randomly initialised 2-layer Llama (~0.5 MB). Its text is
random; its loading, tokenising and generation path through vLLM is the real one.
head_dim is 64 because the CPU attention backend rejects 16.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Kafka topics carry requests from producers to workers.",
    "High priority requests are admitted before low priority ones.",
    "Starvation aging promotes a request that waited too long.",
    "Each tenant has quotas on requests, tokens and concurrency.",
    "The quick brown fox jumps over the lazy dog.",
    "Summarise, translate, explain and list: the usual prompts.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MAX_POSITIONS = 512


def make_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write tokenizer and weights to ``directory`` (idempotent); return the path."""
    directory = Path(directory)
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory
