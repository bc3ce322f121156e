"""Text generation behind one interface: `build_engine(model, engine).generate(requests)`.

Three engines, one `Engine` protocol (`cpt.engines.base`):

    hf      `cpt.engines.hf.HFEngine`          transformers, batched with left padding; the CPU/debug default
    vllm    `cpt.engines.vllm.VLLMEngine`      offline `vllm.LLM`; LoRA via `LoRARequest`; the cluster default
    openai  `cpt.engines.openai.OpenAIEngine`  any OpenAI-compatible server (e.g. a vLLM server job)

Importing this package imports neither torch nor vllm; `build_engine` imports the one it needs.

Behaviour every engine shares:
- System prompts are folded into the first user turn for models with `system_role: false`.
- `Request.json_schema` constrains the output (xgrammar in hf and vllm, `response_format` for servers).
  Whitespace between JSON tokens is not free-form (compact JSON), so a weak model cannot loop on
  spaces until `max_new_tokens`.
- A request with `sampling.seed=None` is seeded from a hash of its id (`request_seed`), so a
  re-run of the same rows reproduces the same samples.
- One bad request gives `Completion(finish_reason="error", error=...)`; it never fails the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cpt.engines.base import (
    Completion,
    Engine,
    Request,
    Sampling,
    adapter_name,
    fold_system,
    group_key,
    request_seed,
)

if TYPE_CHECKING:
    from cpt.config import EngineConfig, ModelConfig

__all__ = [
    "Completion",
    "Engine",
    "Request",
    "Sampling",
    "adapter_name",
    "build_engine",
    "fold_system",
    "group_key",
    "request_seed",
]


def build_engine(model: ModelConfig, engine: EngineConfig, **options: Any) -> Engine:
    """The engine for `model`: `model.engine` if set, else `engine.kind`.

    `options` go to the engine's constructor; the ones every engine accepts:
        adapters (`bool` or None, defaults to None): whether requests may name LoRA adapters.
            Only vLLM cares (it reserves LoRA slots up front); None means `engine.max_loras > 0`.
            hf and openai serve adapters either way.
    """
    from cpt.config import EngineKind

    kind = model.engine or engine.kind
    if isinstance(kind, str):
        kind = EngineKind(kind)
    if kind is EngineKind.hf:
        from cpt.engines.hf import HFEngine

        return HFEngine(model, engine, **options)
    if kind is EngineKind.vllm:
        from cpt.engines.vllm import VLLMEngine

        return VLLMEngine(model, engine, **options)
    if kind is EngineKind.openai:
        from cpt.engines.openai import OpenAIEngine

        return OpenAIEngine(model, engine, **options)
    raise ValueError(f"engine.kind: unknown engine {kind!r} (known: hf, vllm, openai)")
