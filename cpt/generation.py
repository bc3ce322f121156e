"""Workers for the parallel runner: chat rows -> completions, and responses -> judgements.

A work row is a dict with `id`, `messages` (JSON text of the chat), `seed`, optional
`adapter`, and any metadata columns, which are passed through to the output row. The
factories are picklable (plain dataclasses inside), so Ray can ship them to actors, where
each builds its own engine once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cpt.config import EngineConfig, ModelConfig, ModelKind, ParallelConfig, SamplingConfig
from cpt.engines.base import Engine, Request, Sampling
from cpt.parallel import Resources, Row, RunStats, WorkerFactory, run_sharded
from cpt.warm import WarmEngines

_WORK_KEYS = ("id", "seed", "adapter")  # the rest (prompt messages too) passes through


@dataclass
class EngineWorker:
    """A worker that owns its engine: `close()` frees the model when the stage ends."""

    engine: Engine
    work: Callable[[list[Row]], list[Row]]

    def __call__(self, rows: list[Row]) -> list[Row]:
        return self.work(rows)

    def close(self) -> None:
        self.engine.close()


def sampling_of(model: ModelConfig, seed: int) -> Sampling:
    s = model.sampling
    return Sampling(s.max_new_tokens, s.temperature, s.top_p, seed)


def engine_identity(model: ModelConfig, engine: EngineConfig) -> dict[str, Any]:
    """What an engine of `model` is built from: every setting but the role's name and its
    sampling (each request carries its own), so the teacher's engine can serve a judge of the
    same model, path, revision, dtype, context, GPUs and engine settings (`cpt.warm`)."""
    kind = model.engine or engine.kind
    return {
        "model": model.path if model.kind is ModelKind.model else f"program:{model.program}",
        "engine": getattr(kind, "value", kind),
        "settings": dataclasses.replace(model, name="-", sampling=SamplingConfig(), paper_id=""),
        "engine_config": engine,
    }


@dataclass(frozen=True)
class _EngineFactory:
    """A worker factory over one model's engine, reusable (`cpt.warm`): `load` builds the
    engine, `bind` (in each subclass) the worker around it; one identity per model+engine,
    so a teacher's engine can serve a judge of the same model."""

    model: ModelConfig
    engine: EngineConfig

    def __call__(self) -> EngineWorker:
        engine = self.load()
        return EngineWorker(engine, self.bind(engine))

    def warm_identity(self) -> dict[str, Any]:
        return engine_identity(self.model, self.engine)

    def load(self) -> Engine:
        from cpt.engines import build_engine

        return build_engine(self.model, self.engine)

    def bind(self, engine: Engine) -> Callable[[list[Row]], list[Row]]:
        raise NotImplementedError


@dataclass(frozen=True)
class GenerateFactory(_EngineFactory):
    """Builds a worker that runs each row's chat through `model` and keeps the metadata."""

    def bind(self, engine: Engine) -> Callable[[list[Row]], list[Row]]:
        model = self.model

        def work(rows: list[Row]) -> list[Row]:
            requests = [
                Request(
                    id=r["id"],
                    messages=tuple(json.loads(r["messages"])),
                    sampling=sampling_of(model, r["seed"]),
                    adapter=r.get("adapter") or None,
                )
                for r in rows
            ]
            outs = engine.generate(requests)
            return [
                {
                    "id": r["id"],
                    **{k: v for k, v in r.items() if k not in _WORK_KEYS},
                    "text": o.text,
                    "reasoning": o.reasoning,  # a reasoning model's thinking, never in `text`
                    "prompt_tokens": o.prompt_tokens,
                    "cached_tokens": o.cached_tokens,  # into the receipt (parallel.write_rows)
                    "completion_tokens": o.completion_tokens,
                    "finish_reason": o.finish_reason,
                    "ok": o.finish_reason != "error",
                    "error": o.error,
                }
                for r, o in zip(rows, outs)
            ]

        return work


@dataclass(frozen=True)
class JudgeFactory(_EngineFactory):
    """Builds a worker that judges rows (`messages` = the judge prompt) with retries."""

    repair_template: str
    max_attempts: int

    def bind(self, engine: Engine) -> Callable[[list[Row]], list[Row]]:
        from cpt.judge import JudgeItem, judge_all

        def work(rows: list[Row]) -> list[Row]:
            items = [
                JudgeItem(
                    r["id"], tuple(json.loads(r["messages"])), r["seed"], r.get("not_judged") or ""
                )
                for r in rows
            ]
            verdicts, completions = judge_all(
                engine, items, sampling_of(self.model, 0), self.repair_template, self.max_attempts
            )
            tokens: dict[str, int] = {}
            prompt: dict[str, int] = {}
            cached: dict[str, int | None] = {}  # None once an attempt's engine did not say
            for c in completions:
                tokens[c.id] = tokens.get(c.id, 0) + c.completion_tokens
                prompt[c.id] = prompt.get(c.id, 0) + c.prompt_tokens
                known = c.cached_tokens is not None and cached.get(c.id, 0) is not None
                cached[c.id] = cached.get(c.id, 0) + c.cached_tokens if known else None
            return [
                {
                    "id": r["id"],
                    **{k: v for k, v in r.items() if k not in _WORK_KEYS},
                    "score": v.score,
                    "critique": v.critique,
                    "ok": v.ok,
                    "error": v.error,
                    "attempts": v.attempts,
                    "raw": v.raw,
                    "prompt_tokens": prompt.get(r["id"], 0),
                    "completion_tokens": tokens.get(r["id"], 0),
                    "cached_tokens": cached.get(r["id"]),
                }
                for r, v in zip(rows, verdicts)
            ]

        return work


def run_rows(
    rows: list[Row],
    out_dir,
    shard_size: int,
    factory: WorkerFactory,
    model: ModelConfig,
    engine: EngineConfig,
    parallel: ParallelConfig,
    label: str,
    should_stop=None,
    warm: WarmEngines | None = None,
) -> RunStats:
    """`run_sharded` with the replica count, resources and part size taken from the configs;
    `warm`: the run's warm engines (`StageContext.warm`), None to load and close here."""
    from cpt.config import EngineKind

    part_rows = parallel.part_rows
    if not part_rows and (model.engine or engine.kind) in (EngineKind.hf, "hf"):
        part_rows = engine.batch_size  # the engine runs calls of batch_size anyway
    stats = run_sharded(
        rows,
        out_dir,
        shard_size,
        factory,
        backend=parallel.backend,
        replicas=engine.replicas,
        resources=Resources(cpus=engine.cpus_per_replica, gpus=model.gpus),
        ray_address=parallel.address,
        ray_num_cpus=parallel.num_cpus,
        log_every_s=parallel.log_every_s,
        label=label,
        should_stop=should_stop,
        part_rows=part_rows,
        warm=warm,
    )
    stats.prefix_cache = prefix_cache(stats, model, engine)
    return stats


def prefix_cache(stats: RunStats, model: ModelConfig, engine: EngineConfig) -> dict[str, Any]:
    """The manifest's `prefix_cache`: `hit_rate`, the share of prompt tokens the engine served
    from its prefix cache (None when it keeps or reports none, with `why`)."""
    from cpt.config import ModelKind

    kind = getattr(model.engine or engine.kind, "value", model.engine or engine.kind)
    why = ""
    if ModelKind(model.kind) is ModelKind.program:
        why = "a program judge runs no model"
    elif kind == "hf":
        why = "the hf engine keeps no prefix cache (engine=vllm has one)"
    elif kind == "openai" and not stats.cached_tokens:
        why = "the server reported no cached tokens (vllm serve: --enable-prompt-tokens-details)"
    if why or not stats.prompt_tokens:
        return {"hit_rate": None, "why": why or "no prompt tokens"}
    rate = {"hit_rate": round(stats.cached_tokens / stats.prompt_tokens, 4)}
    return rate if engine.prefix_caching else {**rate, "why": "off (engine.prefix_caching=false)"}
