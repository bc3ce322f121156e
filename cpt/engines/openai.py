"""OpenAI-compatible server engine (a vLLM server job, or any chat-completions endpoint).

Serving base + adapters with vLLM so that this engine can address them: `vllm_serve_command`
gives the argv, i.e.

    python -m vllm.entrypoints.openai.api_server --model <resolved path> \\
        --served-model-name <model.path> --enable-lora --lora-modules <adapter_name(p)>=<p> ... \\
        --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cpt.engines.base import (
    Completion,
    Request,
    adapter_name,
    error_completion,
    fold_system,
    request_seed,
)
from cpt.engines.plaintext import neutralise
from cpt.engines.reasoning import split_reasoning, splits_reasoning, template_kwargs

if TYPE_CHECKING:
    from cpt.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx


def vllm_serve_command(
    model: ModelConfig,
    engine: EngineConfig,
    *,
    port: int = 8000,
    host: str = "0.0.0.0",
    adapters: list[str] | None = None,
    enforce_eager: bool = False,
) -> list[str]:
    """argv of a vLLM OpenAI-compatible server that `OpenAIEngine` can talk to.

    Serves `model` under the name `model.path`, each adapter folder under `adapter_name(path)`,
    and emits compact JSON for schema requests (the same choices as `VLLMEngine`). The API key,
    if any, is for the caller to add (`--api-key` or `VLLM_API_KEY`), never a config value.
    """
    import sys

    from cpt.models import resolve_model_path

    path = resolve_model_path(model.path, model.gguf_file)
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", path, "--served-model-name", model.path,
        "--dtype", str(getattr(model.dtype, "value", model.dtype)),
        "--tensor-parallel-size", str(model.tensor_parallel_size),
        "--max-model-len", str(model.max_model_len),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    if not os.path.isdir(path):
        cmd += ["--revision", model.revision]
    if model.trust_remote_code:
        cmd.append("--trust-remote-code")
    if enforce_eager:
        cmd.append("--enforce-eager")
    if adapters:
        cmd += ["--enable-lora", "--max-loras", str(engine.max_loras)]
        cmd += ["--max-lora-rank", str(engine.max_lora_rank), *lora_modules_arg(adapters)]
    return cmd


def lora_modules_arg(adapters: list[str]) -> list[str]:
    """`vllm serve` arguments that serve each adapter folder under `adapter_name(path)`."""
    if not adapters:
        return []
    return ["--lora-modules", *(f"{adapter_name(p)}={os.path.abspath(p)}" for p in adapters)]


class OpenAIEngine:
    """Chat completions against `model.base_url` with the `openai` client.

    - Model name: `model.path` for base requests (start the server with
      `--served-model-name <model.path>`), `adapter_name(request.adapter)` for LoRA requests
      (vLLM's convention: an adapter is addressed as a model; see `lora_modules_arg`).
    - JSON schema: `response_format={"type": "json_schema", ...}`, and, unless
      `server_extras=False`, vLLM's `extra_body={"structured_outputs": {"json": schema}}`
      (turn it off for servers that reject unknown fields). Compact JSON (no free whitespace)
      is a vLLM *server* flag, see the module docstring; per request it is ignored.
    - Message contents are sent `neutralise`d: a control-token string such as `<|im_end|>`
      gets an invisible WORD JOINER after its first character, because the server tokenises
      the rendered chat with special tokens parsed (`cpt.engines.plaintext`).
    - Up to `engine.max_concurrency` requests in flight (a thread pool).
    - Connection errors, timeouts, 408/409/429 and 5xx are retried up to `engine.max_retries`
      times by the `openai` client itself (exponential backoff with jitter, honouring the
      server's `Retry-After`). Then, or at once for other errors, the request gets `Completion(finish_reason="error", error=<text>)`; one
      bad request never fails the others, and the API key never appears in errors or logs.
    - The key is read from the environment variable named by `engine.api_key_env`
      (a missing variable sends "EMPTY", which local vLLM servers accept).
    """

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        adapters: bool | None = None,
        server_extras: bool = True,
    ) -> None:
        import openai

        del adapters  # the server decides which adapters it serves
        if not model.base_url:
            raise ValueError(
                f"{model.name}.base_url: must be set for the openai engine "
                "(e.g. http://host:8000/v1)"
            )
        self.model_cfg = model
        self.engine_cfg = engine
        self.server_extras = server_extras
        self._key = os.environ.get(engine.api_key_env, "")
        self.client = openai.OpenAI(
            base_url=model.base_url,
            api_key=self._key or "EMPTY",
            max_retries=engine.max_retries,  # exponential backoff, jitter, Retry-After
            timeout=engine.request_timeout_s,
        )

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests`."""
        if not requests:
            return []
        workers = min(self.engine_cfg.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cpt-openai") as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    # -- internals --------------------------------------------------------------------------

    def _kwargs(self, req: Request) -> dict[str, Any]:
        s = req.sampling
        kwargs: dict[str, Any] = {
            "model": adapter_name(req.adapter) if req.adapter else self.model_cfg.path,
            "messages": [
                {**m, "content": neutralise(m["content"])}  # the server parses specials
                for m in fold_system(req.messages, self.model_cfg.system_role)
            ],
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p if s.temperature > 0 else 1.0,
            "seed": request_seed(req),
        }
        if req.json_schema:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": req.json_schema, "strict": True},
            }
            if self.server_extras:
                kwargs["extra_body"] = {"structured_outputs": {"json": req.json_schema}}
        template = template_kwargs(self.model_cfg)  # e.g. enable_thinking (vLLM servers read it)
        if template and self.server_extras:
            kwargs.setdefault("extra_body", {})["chat_template_kwargs"] = template
        return kwargs

    def _one(self, req: Request) -> Completion:
        # the client retries connection errors, timeouts, 408/409/429 and 5xx itself
        try:
            resp = self.client.chat.completions.create(**self._kwargs(req))
        except Exception as exc:
            return self._error(req, exc)
        if not resp.choices:
            return error_completion(req, "server returned no choices")
        choice = resp.choices[0]
        usage = resp.usage
        # a server that reports prefix-cache hits (vllm serve --enable-prompt-tokens-details)
        details = getattr(usage, "prompt_tokens_details", None)
        text = choice.message.content or ""
        # a server with a reasoning parser returns the thinking apart; else split it here
        reasoning = getattr(choice.message, "reasoning_content", None) or ""
        if splits_reasoning(self.model_cfg) and not reasoning:
            text, reasoning = split_reasoning(text)
        return Completion(
            id=req.id,
            text=text,
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=choice.finish_reason or "stop",
            reasoning=reasoning,
            cached_tokens=getattr(details, "cached_tokens", None),
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _error(self, req: Request, exc: Exception) -> Completion:
        attempts = 1 + self.engine_cfg.max_retries if _retryable(exc) else 1
        message = self._redact(f"{type(exc).__name__}: {exc}")[:2000]
        log.error(
            "openai: request %s failed after %d attempt(s): %s", req.id, attempts, message[:300]
        )
        return error_completion(req, f"{message} (after {attempts} attempt(s))")


def _retryable(exc: Exception) -> bool:
    """Whether the client retried `exc` (its policy, for the attempt count in the error)."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRY_STATUS or exc.status_code >= 500
    return False
