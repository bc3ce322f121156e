"""Tiny random Llama-style models, built locally and deterministically (no model hub).

They are the models of the fast tests (seconds per pipeline; the local default is the real
SmolLM2-135M, `cpt.models.smollm2`). Widths are multiples of 64 (bitsandbytes 4-bit blocks) and the head
size is 32 (vLLM's CPU attention rejects 16).

    tiny        ChatML template with a system role
    tiny_nosys  the same model, but the template rejects a system turn (like Gemma's),
                so the "fold the system prompt into the first user turn" path is exercised

Build: ``python -m cpt.models.tiny [variant ...]`` prints the folder(s).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cpt.models.cache import build_once, cache_root
from cpt.store import content_hash, file_sha256

BUILDER_VERSION = 2  # bump when the recipe below changes, so caches are rebuilt
CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHATML_NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    system_role: bool = True
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4  # head_dim 32
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0


VARIANTS = {"tiny": TinySpec(system_role=True), "tiny_nosys": TinySpec(system_role=False)}


# the libraries whose versions shape the built files (config.json fields, tokenizer.json
# layout, initial weights): a cache built under other versions is another folder
SHAPING_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")


def library_versions(names: tuple[str, ...] = SHAPING_LIBRARIES) -> dict[str, str]:
    """Installed versions of `names` (part of every built-in model's cache key)."""
    from importlib import metadata

    return {name: metadata.version(name) for name in names}


def tiny_model_dir(variant: str = "tiny", cache_dir: str | Path | None = None) -> Path:
    """Folder of the tiny model ``variant``, built on first use (safe under concurrency)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model {variant!r}; known: {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    key = content_hash(
        {
            "v": BUILDER_VERSION,
            "spec": asdict(spec),
            "corpus": file_sha256(CORPUS),
            "libs": library_versions(),
        },
        12,
    )
    root = Path(cache_dir) if cache_dir else cache_root()
    return build_once(root / f"{variant}-{key}", lambda out: _build(spec, out), "model.safetensors")


def _build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",  # decoder-only generation pads on the left
    )
    fast.chat_template = _CHATML if spec.system_role else _CHATML_NO_SYSTEM
    fast.model_max_length = spec.max_position_embeddings
    return fast


def _build(spec: TinySpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer(spec)
    tokenizer.save_pretrained(out)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=pad, bos_token_id=eos, do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    for name in sys.argv[1:] or list(VARIANTS):
        print(tiny_model_dir(name))
