"""Reasoning models and chat-template quirks: thinking on/off, `<think>` kept out of answers,
templates that inject their own system prompt (the real SmolLM2 template)."""

from __future__ import annotations

import shutil

import pytest
from conftest import compose
from transformers import AutoTokenizer

from cpt.config import EngineConfig, EngineKind, ModelConfig, Reasoning
from cpt.engines import Request, Sampling, build_engine
from cpt.engines.base import blank_system, injects_default_system
from cpt.engines.reasoning import split_reasoning, template_kwargs

USER = ({"role": "user", "content": "Name a colour."},)


@pytest.mark.parametrize(
    ("text", "answer", "reasoning"),
    [
        ("<think>\nIt is red.\n</think>\n\nRed.", "Red.", "It is red."),
        ("Sky first.</think>Blue.", "Blue.", "Sky first."),  # R1 templates open <think> themselves
        ("  <think>\nstill thinking when cut", "", "still thinking when cut"),
        ("<think>\n\n</think>\n\nGreen.", "Green.", ""),  # Qwen3 with thinking disabled
        ("No thinking here.", "No thinking here.", ""),
        ("a </think> b </think> c", "b </think> c", "a"),  # only the first block is thinking
    ],
)
def test_split_reasoning(text, answer, reasoning):
    assert split_reasoning(text) == (answer, reasoning)


def test_presets_carry_their_reasoning_setting():
    for role in ("teacher", "judge", "student"):
        for preset in ("qwen3_4b", "qwen3_8b", "qwen3_32b"):
            m = getattr(compose(f"{role}={preset}"), role)
            assert m.reasoning is Reasoning.disabled
            assert template_kwargs(m) == {"enable_thinking": False}
        m = getattr(compose(f"{role}=deepseek_r1_distill_qwen_32b"), role)
        assert m.reasoning is Reasoning.enabled and template_kwargs(m) == {"enable_thinking": True}
    for preset in ("smollm2_135m", "tiny", "gemma2_9b", "llama33_70b"):
        m = compose(f"student={preset}").student
        assert m.reasoning is Reasoning.none and template_kwargs(m) == {}
    m = ModelConfig(name="q", path="p", reasoning=Reasoning.enabled,
                    chat_template_kwargs={"enable_thinking": False, "x": 1})  # fmt: skip
    assert template_kwargs(m) == {"enable_thinking": False, "x": 1}  # explicit kwargs win


THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory, tiny_dir):
    """The tiny model with a Qwen3-like template that reads `enable_thinking`."""
    d = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(d)
    return d


def test_hf_engine_passes_thinking_switch_and_splits_thinking_off(thinking_dir):
    cfgs = {
        mode: ModelConfig(name="t", path=str(thinking_dir), max_model_len=512, reasoning=mode)
        for mode in Reasoning
    }
    engines = {m: build_engine(c, EngineConfig(kind=EngineKind.hf)) for m, c in cfgs.items()}
    req = Request("a", USER, Sampling(8, 0.0))
    prompts = {m: e.tokenizer.decode(e._prompt_ids(req)) for m, e in engines.items()}
    assert prompts[Reasoning.disabled].endswith("assistant\n<think>\n\n</think>\n\n")
    assert prompts[Reasoning.enabled].endswith("assistant\n") == prompts[Reasoning.none].endswith(
        "assistant\n"
    )
    tok = engines[Reasoning.enabled].tokenizer
    out = tok("<think>pick one</think>Red.", add_special_tokens=False)["input_ids"]
    done = engines[Reasoning.enabled]._completion(req, [1, 2], [*out, tok.eos_token_id])
    assert (done.text, done.reasoning, done.finish_reason) == ("Red.", "pick one", "stop")
    thinking = tok("<think>pick one", add_special_tokens=False)["input_ids"]
    cut = engines[Reasoning.enabled]._completion(req, [1, 2], thinking)  # no EOS: cut short
    assert (cut.text, cut.reasoning, cut.finish_reason) == ("", "pick one", "length")
    plain = engines[Reasoning.none]._completion(req, [1, 2], [*out, tok.eos_token_id])
    assert plain.text == "<think>pick one</think>Red." and plain.reasoning == ""  # model text: data


def test_blank_system_only_where_the_template_injects(tiny_dir, tiny_nosys_dir):
    for d in (tiny_dir, tiny_nosys_dir):  # plain ChatML; a template that rejects system turns
        assert not injects_default_system(AutoTokenizer.from_pretrained(d))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert blank_system(msgs) == msgs
    assert blank_system(msgs[1:]) == [{"role": "system", "content": ""}, msgs[1]]


@pytest.mark.slow
def test_real_smollm2_template_baseline_has_no_injected_persona():
    """SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." to a chat without
    a system turn; the no-system baseline must not carry it (an empty system turn instead)."""
    real = compose("teacher=smollm2_135m").teacher
    engine = build_engine(real, EngineConfig(kind=EngineKind.hf))
    assert injects_default_system(engine.tokenizer)
    raw = engine.tokenizer.apply_chat_template(list(USER), tokenize=False)
    assert "named SmolLM" in raw  # the quirk is real
    baseline = engine.tokenizer.decode(engine._prompt_ids(Request("b", USER)))
    assert "SmolLM" not in baseline
    assert baseline.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nName a colour.")
    conditioned = ({"role": "system", "content": "Be terse."}, *USER)
    text = engine.tokenizer.decode(engine._prompt_ids(Request("c", conditioned)))
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "SmolLM" not in text
    out = engine.generate([Request("g", USER, Sampling(24, 0.0))])[0]
    assert out.finish_reason in ("stop", "length") and len(out.text.split()) >= 2  # real words
