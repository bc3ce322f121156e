"""What a config asks the models to do, counted before anything runs, and what they did.

A stage's work is one or more `Phase`s: a model generating (teacher, student), judging,
or training. Each stage says its phases twice: `StageSpec.estimate(cfg)` counts them from
the config alone (requests exactly, from the same work grids the stage builds; tokens as
bounds: `requests x max_new_tokens`), and its `run` records the phases it actually ran
(counted tokens, the runner's time with and without engine start-up) in its manifest.
`cpt.planner` learns throughput from the second and applies it to the first.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cpt.config import CptConfig, EngineConfig, ModelConfig
    from cpt.parallel import RunStats
    from cpt.tasks import Task

CHARS_PER_TOKEN = 4.0  # prompt tokens before a model's tokenizer is at hand (shown, not timed)
GENERATE, JUDGE, TRAIN = "generate", "judge", "train"  # phase kinds (throughput differs)


@dataclass(frozen=True)
class Phase:
    """One model's share of a stage.

    label: its role in the stage (`teacher`, `judge`, `student`, `judge:<name>`, ...).
    kind: generate | judge | train. model: the model's path (its id); engine: what runs it.
    requests: prompts sent (training: preference rows processed).
    prompt_tokens: estimated (from characters) or counted by the engine.
    bound_tokens: requests x max_new_tokens (training: the rows' sequence tokens): the most
        the phase can produce; completion_tokens: counted (an estimate leaves it 0).
    units: what the phase's time grows with (`work_units`).
    seconds: the runner's time, engine start-up included; work_seconds: the shards' own time.
    """

    label: str
    kind: str
    model: str
    engine: str
    requests: int
    prompt_tokens: int
    bound_tokens: int
    units: int
    completion_tokens: int = 0
    seconds: float = 0.0
    work_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_name(model: ModelConfig, engine: EngineConfig) -> str:
    """`hf`, `vllm`, `openai`, or `program` for a program judge."""
    if getattr(model.kind, "value", model.kind) == "program":
        return "program"
    kind = model.engine or engine.kind
    return str(getattr(kind, "value", kind))


def prompt_chars(rows: list[dict[str, Any]]) -> int:
    """Characters of the chat messages of work rows (`messages`: JSON text)."""
    return sum(sum(len(m["content"]) for m in json.loads(r["messages"])) for r in rows)


def calls(rows: int, shard_size: int, batch: int) -> int:
    """Engine calls of `batch` rows at most that `rows` cut in shards of `shard_size` make."""
    full, rest = divmod(rows, shard_size)
    per = min(batch, shard_size)
    return full * math.ceil(shard_size / per) + math.ceil(rest / per)


def work_units(cfg: CptConfig, model: ModelConfig, rows: int, shard_size: int) -> int:
    """What a generation or judging phase's time grows with. The hf engine decodes batches
    of `engine.batch_size` (within a shard's parts) step by step until the longest is done:
    batches x `max_new_tokens` steps. Engines that batch continuously (vLLM, a server):
    tokens, bounded by requests x `max_new_tokens`."""
    max_new = model.sampling.max_new_tokens
    if engine_name(model, cfg.engine) != "hf":
        return rows * max_new
    batch = min(cfg.parallel.part_rows or cfg.engine.batch_size, cfg.engine.batch_size)
    return calls(rows, shard_size, batch) * max_new


def estimate(
    cfg: CptConfig,
    label: str,
    kind: str,
    model: ModelConfig,
    rows: list[dict[str, Any]],
    shard_size: int,
) -> Phase:
    """A generation or judging phase of these work rows (rows marked `not_judged` are never
    sent); tokens bounded by the model's `max_new_tokens`."""
    sent = [r for r in rows if not r.get("not_judged")]
    return Phase(
        label=label,
        kind=kind,
        model=model.path,
        engine=engine_name(model, cfg.engine),
        requests=len(sent),
        prompt_tokens=math.ceil(prompt_chars(sent) / CHARS_PER_TOKEN),
        bound_tokens=len(sent) * model.sampling.max_new_tokens,
        units=work_units(cfg, model, len(rows), shard_size),
    )


def actual(
    cfg: CptConfig, label: str, kind: str, model: ModelConfig, stats: RunStats, shard_size: int
) -> dict[str, Any]:
    """The phase a runner just ran, for the stage's manifest (`phases`)."""
    return Phase(
        label=label,
        kind=kind,
        model=model.path,
        engine=engine_name(model, cfg.engine),
        requests=stats.rows,
        prompt_tokens=stats.prompt_tokens,
        bound_tokens=stats.rows * model.sampling.max_new_tokens,
        units=work_units(cfg, model, stats.rows, shard_size),
        completion_tokens=stats.tokens,
        seconds=stats.seconds,
        work_seconds=stats.shard_seconds,
    ).as_dict()


def fake_responses(rows: list[dict[str, Any]], model: ModelConfig) -> list[dict[str, Any]]:
    """Stand-ins for the responses of generation rows (`max_new_tokens` words each, finished),
    so judging grids can be counted before the responses exist."""
    text = "word " * model.sampling.max_new_tokens
    keep = ("id", "task_id", "rubric", "level", "sample_idx", "kind", "student", "model")
    return [
        {**{k: r[k] for k in keep if k in r}, "text": text, "ok": True, "finish_reason": "stop"}
        for r in rows
    ]


def teacher_grid(cfg: CptConfig, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generate stage's work: one row per (task, condition that applies to it, sample),
    then the task's no-rubric baseline rows (rubric and level empty)."""
    from cpt import store
    from cpt.prompts import conditions, teacher_messages, teacher_no_rubric_messages
    from cpt.rows import work_row

    conds = conditions(cfg)
    rows = []
    for task in tasks:
        variants = [
            (
                c.rubric,
                c.level,
                "rubric",
                teacher_messages(cfg.prompts, cfg.levels, c, task["text"]),
            )
            for c in conds
            if c.applies_to(task["genre"])
        ]
        if cfg.generate.no_rubric:
            msgs = teacher_no_rubric_messages(cfg.prompts, task["text"])
            variants.append(("", "", "no_rubric", msgs))
        for rubric, level, kind, msgs in variants:
            for s in range(cfg.generate.samples):
                rows.append(
                    work_row(
                        store.content_hash(["gen", task["id"], rubric, level, s]),
                        msgs,
                        cfg.seed,
                        task_id=task["id"],
                        rubric=rubric,
                        level=level,
                        sample_idx=s,
                        kind=kind,
                    )
                )
    return rows


def load_config_tasks(cfg: CptConfig) -> list[Task]:
    """The tasks of the config's sources (relative paths: cwd, then repo root)."""
    from cpt.config import resolve_path
    from cpt.tasks import TaskSource, load_tasks

    sources = [
        TaskSource(**{**vars(s), "path": str(resolve_path(s.path)) if s.path else ""})
        for s in cfg.tasks.sources
    ]
    return load_tasks(sources, num_tasks=cfg.tasks.num_tasks, seed=cfg.seed)


def config_tasks(cfg: CptConfig) -> list[dict[str, Any]]:
    """The task table the tasks stage will write (id, text, genre, split), from the config."""
    from cpt.tasks import split_tasks

    tasks = load_config_tasks(cfg)
    split = split_tasks(tasks, cfg.tasks.test_fraction, cfg.seed)
    return [
        {"id": t.task_id, "text": t.text, "genre": t.genre, "split": split[t.task_id]}
        for t in tasks
    ]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
