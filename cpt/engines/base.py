"""The one engine interface: chat requests in, completions out.

Stages build `Request`s and never know which engine runs them. An engine is built from a
`ModelConfig` and an `EngineConfig` by `cpt.engines.build_engine`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling. `seed` makes sampled outputs reproducible per request."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None


@dataclass(frozen=True)
class Request:
    """One generation: chat messages (role/content dicts) + sampling (+ JSON schema, adapter).

    `adapter` is the path of a PEFT LoRA adapter folder; None means the base model.
    `json_schema` constrains the output to JSON matching the schema (judging).
    """

    id: str
    messages: tuple[dict[str, str], ...]
    sampling: Sampling = field(default_factory=Sampling)
    json_schema: dict[str, Any] | None = None
    adapter: str | None = None


@dataclass(frozen=True)
class Completion:
    """The engine's answer to one `Request` (same `id`)."""

    id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS / stop string), "length" (hit max_new_tokens), "error"
    error: str = ""
    reasoning: str = ""  # thinking of a reasoning model, kept out of `text` (engines.reasoning)
    # prompt tokens served from the engine's prefix cache (None: the engine does not say);
    # how the answer was computed, not what it is, so it takes no part in ==
    cached_tokens: int | None = field(default=None, compare=False)


class Engine(Protocol):
    """What every engine implements."""

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests`."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory, server sessions)."""
        ...


def fold_system(
    messages: tuple[dict[str, str], ...] | list[dict[str, str]], system_role: bool
) -> list[dict[str, str]]:
    """Messages as the model's chat template accepts them.

    Models without a system role get the system text folded into the first user turn
    (separated by a blank line), so the conditioning is never dropped.
    """
    msgs = [dict(m) for m in messages]
    if system_role or not msgs or msgs[0]["role"] != "system":
        return msgs
    system, rest = msgs[0]["content"], msgs[1:]
    if rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        return rest
    return [{"role": "user", "content": system}, *rest]


def injects_default_system(tokenizer: Any) -> bool:
    """Whether the chat template adds its own system turn to a chat that has none.

    SmolLM2 ("You are a helpful AI assistant named SmolLM...") and Qwen2.5 do. Detected by
    rendering one user turn with and without an explicit empty system turn: only a template
    that injects text makes the chat without a system turn the longer one. A template that
    rejects a system turn does not inject one.
    """
    user = {"role": "user", "content": "x"}
    try:
        bare = tokenizer.apply_chat_template([user], tokenize=False)
        empty = tokenizer.apply_chat_template(
            [{"role": "system", "content": ""}, user], tokenize=False
        )
    except Exception:
        return False
    return len(bare) > len(empty)


def blank_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` with an empty system turn first if they have none: for templates that would
    otherwise inject their own default system prompt into a chat meant to have none (the
    no-rubric baseline, teacher and summarizer prompts)."""
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": ""}, *messages]


def error_completion(req: Request, message: str, prompt_tokens: int = 0) -> Completion:
    """A failed request as a completion (finish_reason "error"): counted, never raised."""
    return Completion(
        id=req.id,
        text="",
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        finish_reason="error",
        error=message,
    )


def request_seed(request: Request) -> int:
    """The request's sampling seed; `seed=None` becomes a stable hash of the request id."""
    if request.sampling.seed is not None:
        return int(request.sampling.seed)
    digest = hashlib.sha256(request.id.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def adapter_name(adapter: str) -> str:
    """Stable served name of a LoRA adapter folder: `<folder name>-<8 hex of its absolute path>`.

    The same name is used by PEFT (hf), `LoRARequest` (vllm) and as the model name on an
    OpenAI-compatible server (start vLLM with `--lora-modules <adapter_name(p)>=<p>`, see
    `cpt.engines.openai.lora_modules_arg`). A string that is not an existing folder and has no
    path separator is taken as an already served name.
    """
    p = Path(adapter).expanduser()
    if os.sep not in adapter and not p.exists():
        return adapter
    full = str(p.absolute())
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.absolute().name) or "adapter"
    return f"{stem}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"


def group_key(request: Request) -> tuple[Any, ...]:
    """Requests with equal keys can share one batched engine call."""
    schema = json.dumps(request.json_schema, sort_keys=True) if request.json_schema else ""
    return (
        request.sampling.max_new_tokens,
        request.sampling.temperature,
        request.sampling.top_p,
        schema,
        request.adapter or "",
    )
