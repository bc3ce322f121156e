"""The locally built tiny models: deterministic, valid, generate, two chat templates."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.models import resolve_model_path
from cpt.models.tiny import VARIANTS, tiny_model_dir


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic(tmp_path, tiny_dir):
    again = tiny_model_dir("tiny", tmp_path)
    assert digest(again) == digest(tiny_dir)
    assert (tiny_dir / "model.safetensors").exists()
    assert not list(tiny_dir.glob("*.bin"))  # safetensors only


def test_shapes_fit_bitsandbytes_and_vllm(tiny_dir):
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(tiny_dir)
    assert c.hidden_size % 64 == 0 and c.intermediate_size % 64 == 0
    assert c.hidden_size // c.num_attention_heads >= 32


def test_generates_and_stops(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    enc = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    text = tok.decode(enc["input_ids"][0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8 or out[0, -1] == tok.eos_token_id
    assert tok.padding_side == "left" and tok.pad_token is not None


def test_nosys_template_rejects_a_system_turn(tiny_nosys_dir):
    tok = AutoTokenizer.from_pretrained(tiny_nosys_dir)
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(
            [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}], tokenize=False
        )
    assert "user" in tok.apply_chat_template([{"role": "user", "content": "y"}], tokenize=False)


def test_resolve_builtin_paths(tiny_dir):
    assert resolve_model_path("builtin:tiny") == str(tiny_dir)
    assert resolve_model_path("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert set(VARIANTS) == {"tiny", "tiny_nosys"}
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny_model_dir("huge")


def test_cache_is_keyed_by_the_library_versions(tmp_path, monkeypatch):
    """A tiny model cached under one transformers version is not reused under another
    (its config.json differs), so byte-identity checks hold across venvs."""
    from cpt.models import tiny

    monkeypatch.setattr(
        tiny, "_build", lambda spec, out: (out / "model.safetensors").write_bytes(b"")
    )
    first = tiny_model_dir("tiny", tmp_path)
    assert tiny_model_dir("tiny", tmp_path) == first  # same versions: the cache is reused
    versions = {**tiny.library_versions(), "transformers": "0.0.1"}
    monkeypatch.setattr(tiny, "library_versions", lambda: versions)
    assert tiny_model_dir("tiny", tmp_path) != first
