"""HF transformers engine: batched generation with left padding (the CPU/debug default).

>>> from cpt.config import EngineConfig, ModelConfig
>>> from cpt.engines import Request, Sampling, build_engine
>>> engine = build_engine(ModelConfig(name="tiny", path="builtin:tiny"), EngineConfig())
>>> engine.generate([Request("a", ({"role": "user", "content": "hi"},), Sampling(8, 0.0))])
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import transformers

from cpt.engines.base import (
    Completion,
    Request,
    adapter_name,
    blank_system,
    error_completion,
    fold_system,
    group_key,
    injects_default_system,
    request_seed,
)
from cpt.engines.plaintext import chat_prompt_ids
from cpt.engines.reasoning import split_reasoning, splits_reasoning, template_kwargs
from cpt.engines.schema import compile_json_schema, schema_text
from cpt.models import resolve_model_path

if TYPE_CHECKING:
    from cpt.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)


class HFEngine:
    """transformers `AutoModelForCausalLM` behind the `Engine` interface.

    - Prompts: the tokenizer's chat template on `fold_system(messages, model.system_role)`,
      tokenized without extra special tokens (the template already has them); message
      contents are plain text, never control tokens (`cpt.engines.plaintext`). A template
      that injects its own default system prompt gets an explicit empty system turn instead
      (`blank_system`); `template_kwargs(model)` (e.g. `enable_thinking`) go to the template.
    - Reasoning models (`model.reasoning` disabled/enabled): `<think>` text goes to
      `Completion.reasoning`, the answer to `text` (`cpt.engines.reasoning`).
    - Batching: requests with the same `group_key` (sampling except the seed, JSON schema,
      adapter) share batches of `engine.batch_size`, longest prompts first, left-padded.
    - Sampling: temperature 0 is greedy. Otherwise temperature and top-p shape the logits and
      each row adds Gumbel noise from its own `torch.Generator` seeded by `request_seed`, then
      takes the argmax: an exact sample of the same distribution whose randomness depends only
      on the request, so a seeded request gives the same text alone or in any batch (up to
      float rounding from padding). The model's own `generation_config` sampling defaults
      (top_k, repetition penalty...) are not applied, as in vLLM.
    - JSON schema: xgrammar's `LogitsProcessor` (`xgrammar.contrib.hf`) masks the logits.
    - LoRA: each adapter folder is loaded once with PEFT (name: `adapter_name(path)`); base
      requests run with adapters disabled.
    - Token counts exclude padding; the EOS token counts as a completion token (as in vLLM);
      finish_reason is "stop" when an EOS was produced, else "length".

    Assumptions:
        Weights are safetensors (`use_safetensors=True`); `trust_remote_code` comes from the
        model config and is False unless a model's config turns it on.

    Raises:
        OSError / ValueError from transformers when the model folder or id cannot be loaded.
        (Per-request problems, such as a prompt longer than `max_model_len` or a chat template
        rejecting the messages, become `Completion(finish_reason="error")`.)
    """

    def __init__(
        self,
        model: ModelConfig,
        engine: EngineConfig,
        *,
        adapters: bool | None = None,
        device: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        del adapters  # PEFT loads adapters on demand; nothing to reserve
        self.model_cfg = model
        self.engine_cfg = engine
        self.path = resolve_model_path(model.path, model.gguf_file)
        trust = bool(model.trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, revision=model.revision, trust_remote_code=trust
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.blank_system = model.system_role and injects_default_system(self.tokenizer)
        self.template_kwargs = template_kwargs(model)
        dtype_name = getattr(model.dtype, "value", model.dtype)
        dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = (
            AutoModelForCausalLM.from_pretrained(
                self.path,
                revision=model.revision,
                trust_remote_code=trust,
                use_safetensors=True,
                dtype=dtype,
            )
            .to(self.device)
            .eval()
        )
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # transformers fills every field our GenerationConfig leaves unset from the model's
        # generation_config (repetition_penalty, min_length, suppress_tokens...); keep only the
        # special tokens so a request means the same here as in vLLM
        self.checkpoint_generation_config = self.model.generation_config
        self.model.generation_config = transformers.GenerationConfig(
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.checkpoint_generation_config.bos_token_id,
        )
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._adapters: dict[str, str] = {}  # adapter path -> PEFT adapter name
        self._grammar_compiler: Any = None
        self._grammars: dict[str, Any] = {}

    # -- public -----------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Completions in the order of `requests` (see the class docstring)."""
        t0 = time.perf_counter()
        done: dict[int, Completion] = {}
        prompts: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            try:
                prompts[i] = self._prompt_ids(req)
            except Exception as exc:
                done[i] = error_completion(
                    req, f"chat template failed: {exc}" + _template_hint(exc)
                )
                continue
            if len(prompts[i]) >= self.model_cfg.max_model_len:
                done[i] = error_completion(
                    req,
                    f"prompt has {len(prompts[i])} tokens, max_model_len is "
                    f"{self.model_cfg.max_model_len}",
                    len(prompts[i]),
                )
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, req in enumerate(requests):
            if i not in done:
                groups.setdefault(group_key(req), []).append(i)
        bs = self.engine_cfg.batch_size
        for idxs in groups.values():
            idxs.sort(key=lambda i: -len(prompts[i]))  # similar lengths together: less padding
            for start in range(0, len(idxs), bs):
                chunk = idxs[start : start + bs]
                reqs = [requests[i] for i in chunk]
                try:
                    outs = self._generate_batch(reqs, [prompts[i] for i in chunk])
                except Exception as exc:
                    log.exception(
                        "hf batch of %d requests failed (first id %s)", len(reqs), reqs[0].id
                    )
                    outs = [
                        error_completion(r, f"{type(exc).__name__}: {exc}", len(prompts[i]))
                        for r, i in zip(reqs, chunk)
                    ]
                done.update(zip(chunk, outs))
        result = [done[i] for i in range(len(requests))]
        n_tok = sum(c.completion_tokens for c in result)
        dt = time.perf_counter() - t0
        log.debug(
            "hf: %d requests, %d new tokens in %.2fs (%.1f tok/s)",
            len(requests),
            n_tok,
            dt,
            n_tok / max(dt, 1e-9),
        )
        return result

    def close(self) -> None:
        """Drop the model and free its memory."""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- internals --------------------------------------------------------------------------

    def _prompt_ids(self, req: Request) -> list[int]:
        messages = fold_system(req.messages, self.model_cfg.system_role)
        if self.blank_system:
            messages = blank_system(messages)
        # contents stay plain text; template_kwargs e.g. enable_thinking
        return chat_prompt_ids(self.tokenizer, messages, **self.template_kwargs)

    def _generate_batch(self, reqs: list[Request], prompts: list[list[int]]) -> list[Completion]:
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        s = reqs[0].sampling  # the same for the whole batch (group_key), except the seed
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor(
            [[pad] * (width - len(p)) + p for p in prompts], device=self.device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        processors = LogitsProcessorList()
        if reqs[0].json_schema:
            from xgrammar.contrib.hf import LogitsProcessor as GrammarProcessor

            processors.append(GrammarProcessor(self._grammar(reqs[0].json_schema)))
        if s.temperature > 0:
            processors.append(TemperatureLogitsWarper(s.temperature))
            if s.top_p < 1.0:
                processors.append(TopPLogitsWarper(s.top_p))
            processors.append(SeededGumbel([request_seed(r) for r in reqs]))
        gen_cfg = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.eos_ids,
            pad_token_id=pad,
        )
        with self._adapter(reqs[0].adapter), torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=gen_cfg,
                logits_processor=processors,
            )
        new_tokens = out[:, width:].tolist()
        return [self._completion(r, p, toks) for r, p, toks in zip(reqs, prompts, new_tokens)]

    def _completion(self, req: Request, prompt: list[int], tokens: list[int]) -> Completion:
        eos = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        n, finish = (eos + 1, "stop") if eos is not None else (len(tokens), "length")
        room = self.model_cfg.max_model_len - len(prompt)
        if n > room:  # the context is full before max_new_tokens
            n, finish, eos = room, "length", None
        text_tokens = tokens[:eos] if eos is not None else tokens[:n]
        text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
        reasoning = ""
        if splits_reasoning(self.model_cfg):
            text, reasoning = split_reasoning(text)
        return Completion(
            id=req.id,
            text=text,
            prompt_tokens=len(prompt),
            completion_tokens=n,
            finish_reason=finish,
            reasoning=reasoning,
        )

    def _grammar(self, schema: dict[str, Any]) -> Any:
        key = schema_text(schema)
        if key not in self._grammars:
            import xgrammar as xgr

            if self._grammar_compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_ids
                )
                self._grammar_compiler = xgr.GrammarCompiler(info)
            self._grammars[key] = compile_json_schema(self._grammar_compiler, schema)
        return self._grammars[key]

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        """Run the block with `adapter` active, or with adapters disabled for None."""
        if adapter is None:
            if self._adapters:  # the model is a PeftModel: switch LoRA off for base requests
                with self.model.disable_adapter():
                    yield
            else:
                yield
            return
        name = self._adapters.get(adapter)
        if name is None:
            name = self._load_adapter(adapter)
        self.model.set_adapter(name)
        yield

    def _load_adapter(self, path: str) -> str:
        from peft import PeftModel

        name = adapter_name(path).replace("-", "_")
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(
                self.model, path, adapter_name=name, is_trainable=False
            )
        self.model.eval()
        self._adapters[path] = name
        log.info("hf: loaded LoRA adapter %s as %r", path, name)
        return name


class SeededGumbel(transformers.LogitsProcessor):
    """Logits processor: add Gumbel(0, 1) noise drawn from one generator per row.

    With greedy decoding after it, `argmax(logits + G)` is an exact sample from
    `softmax(logits)` (the Gumbel-max trick); row i's noise comes only from `seeds[i]`.
    The generators live on the logits' device, so a seed gives one sample on CPU and
    another (equally reproducible) on CUDA.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:  # on the logits' device: no host-to-device copy per step
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
            ]
        vocab = scores.shape[-1]
        u = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
        return scores + gumbel.to(scores.dtype)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _template_hint(exc: Exception) -> str:
    if "system" in str(exc).lower():
        return " (if the model has no system role, set `system_role: false` in its model config)"
    return ""
