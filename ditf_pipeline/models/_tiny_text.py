"""Toy text encoders and tokenizers, built offline from in-memory vocabularies.

The tiny models must run the same prompt-encoding code as the real ones (tokenize, encode,
pool) without any download, so CLIP and T5 are built here at toy width with a character-level
vocabulary. Call under a fixed torch seed (the adapters do).
"""

from __future__ import annotations

import string

from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_LETTERS = string.ascii_lowercase + string.digits


def tiny_clip_tokenizer() -> CLIPTokenizer:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _LETTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip(hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(_LETTERS),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_t5_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + char, -1.0) for char in _LETTERS] + [(char, -2.0) for char in _LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5(d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=3 + 2 * len(_LETTERS),
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


#: characters of the toy fast tokenizers (with a space and SentencePiece's word marker)
_FAST_CHARS = _LETTERS + " \u2581"


def tiny_fast_tokenizer(cls, specials: list[str], **tokens):
    """A character-level fast tokenizer of class `cls` (GemmaTokenizerFast, Qwen2TokenizerFast, ...).

    Built from a `tokenizers` WordLevel model, then saved and loaded back once: transformers
    rebuilds some fast tokenizers from their files (normaliser, pre-tokeniser), so only the
    reloaded one encodes exactly as a `--weights` folder's copy will.
    """
    import tempfile

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate([*specials, *_FAST_CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=tokens.get("unk_token") or specials[-1]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = cls(tokenizer_object=backend, **tokens)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return cls.from_pretrained(folder)


def tiny_gemma_tokenizer():
    from transformers import GemmaTokenizerFast

    return tiny_fast_tokenizer(GemmaTokenizerFast, ["<pad>", "<eos>", "<bos>", "<unk>"],
                               bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def tiny_gemma2(hidden_size: int = 32):
    """Gemma-2 text encoder at toy width (Sana's encoder family)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=4 + len(_FAST_CHARS), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma2Model(config)


def tiny_qwen2_tokenizer():
    from transformers import Qwen2TokenizerFast

    return tiny_fast_tokenizer(Qwen2TokenizerFast, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None)


def tiny_qwen25_vl(hidden_size: int = 32):
    """Qwen2.5-VL at toy width (Qwen-Image's text encoder; its vision tower is built, never used)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"},
            bos_token_id=1, eos_token_id=0, pad_token_id=0,
        ),
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=hidden_size, num_heads=2, intermediate_size=32,
                           fullatt_block_indexes=[0]),
        vocab_size=64, image_token_id=60, video_token_id=61, vision_start_token_id=62,
        bos_token_id=1, eos_token_id=0, pad_token_id=0,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


#: a minimal chat template (the toy tokenizers have none): "<|im_start|>role\ncontent<|im_end|>\n" per message
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen3_tokenizer():
    """Qwen2TokenizerFast with a chat template (Flux.2 klein formats prompts as a chat)."""
    from transformers import Qwen2TokenizerFast

    return tiny_fast_tokenizer(Qwen2TokenizerFast, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None,
                               chat_template=_CHAT_TEMPLATE)


def tiny_qwen3(hidden_size: int = 16, layers: int = 3):
    """Qwen3 causal LM at toy width (Flux.2 klein's text encoder)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=0, pad_token_id=0,
    )
    return Qwen3ForCausalLM(config)
