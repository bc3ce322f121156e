"""Reasoning models: thinking switched on or off per model, and the thinking kept out of answers.

Qwen3 thinks by default and DeepSeek-R1 distills always reason first; their `<think>...</think>`
text must not flow into teacher responses, system prompts, pairs or evaluations. A model's
`reasoning` setting (`cpt.config.Reasoning`) says what to do:

    none      not a reasoning model: the text is the answer, untouched (default)
    disabled  ask the template for no thinking (`enable_thinking=False`, which Qwen3 reads;
              other templates ignore it); any thinking that still appears is split off
    enabled   let the model think (`enable_thinking=True`); the thinking is split off

Split off means: the completion's `text` is the answer after `</think>`, and `reasoning` holds
the thinking. A generation that ends inside its thinking (cut at `max_new_tokens`) has an
empty answer, and its finish_reason "length" marks it as truncated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cpt.config import ModelConfig

OPEN, CLOSE = "<think>", "</think>"


def template_kwargs(model: ModelConfig) -> dict[str, Any]:
    """Extra chat-template variables of `model`: its `chat_template_kwargs`, plus
    `enable_thinking` from its `reasoning` setting unless given there."""
    kwargs = dict(model.chat_template_kwargs or {})
    mode = getattr(model.reasoning, "value", model.reasoning)
    if mode != "none":
        kwargs.setdefault("enable_thinking", mode == "enabled")
    return kwargs


def split_reasoning(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a reasoning model's output.

    `<think>R</think>A` -> (A, R); `R</think>A` (templates that open the block themselves, as
    R1 distills do) -> (A, R); `<think>R` without an end (cut short) -> ("", R); text without
    a thinking block -> (text, "").
    """
    head, sep, answer = text.partition(CLOSE)
    if sep:
        return answer.strip(), head.strip().removeprefix(OPEN).strip()
    stripped = text.lstrip()
    if stripped.startswith(OPEN):
        return "", stripped.removeprefix(OPEN).strip()
    return text, ""


def splits_reasoning(model: ModelConfig) -> bool:
    """Whether completions of `model` have their thinking split off."""
    return getattr(model.reasoning, "value", model.reasoning) != "none"
