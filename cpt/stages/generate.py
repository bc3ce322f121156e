"""generate: tasks x conditions (rubric(s) x level(s)) x samples through the teacher phi.
Reads tasks/; writes generate/*.parquet: id, task_id, rubric, level, sample_idx, kind
("rubric" or "no_rubric", the paper's Table 2 baseline), text, token counts, finish_reason.
Run alone: python jobs/launch.py stage=generate
"""

from __future__ import annotations

from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.generation import GenerateFactory, run_rows
from cpt.graph import StageContext, StageSpec
from cpt.parallel import n_shards
from cpt.prompts import (
    conditions,
    conditions_fingerprint,
    generation_rows,
    teacher_messages,
    teacher_no_rubric_messages,
)
from cpt.rows import work_row


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "teacher": cfg.teacher,
        "engine": (cfg.teacher.engine or cfg.engine.kind),
        "conditions": conditions_fingerprint(cfg),
        "levels": cfg.levels,
        "templates": [
            cfg.prompts.teacher,
            cfg.prompts.teacher_target,
            cfg.prompts.teacher_no_rubric,
        ],
        "prefix_layout": cfg.prompts.prefix_layout,  # where the targets stand
        "generate": cfg.generate,
        "seed": cfg.seed,
    }


def work_grid(cfg: CptConfig, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One work row per (task, condition that applies to it, sample), then the task's
    no-rubric baseline rows (rubric and level empty)."""
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


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tasks = store.read_table(ctx.inputs["tasks"]).to_pylist()
    rows = work_grid(cfg, tasks)
    stats = run_rows(
        rows,
        ctx.out_dir,
        cfg.generate.shard_size,
        GenerateFactory(cfg.teacher, cfg.engine),
        cfg.teacher,
        cfg.engine,
        cfg.parallel,
        label="generate",
        warm=ctx.warm,
    )
    return stats.as_dict()


def plan(cfg: CptConfig) -> dict[str, Any]:
    n = generation_rows(cfg)
    if n is None:
        return {"tasks": "all"}
    return {"rows<=": n, "shards<=": n_shards(n, cfg.generate.shard_size)}


SPEC = StageSpec("generate", ("tasks",), params, run, plan, runs=("teacher",))
