"""generate: tasks x conditions (rubric(s) x level(s)) x samples through the teacher phi.
Reads tasks/; writes generate/*.parquet: id, task_id, rubric, level, sample_idx, kind
("rubric" or "no_rubric", the paper's Table 2 baseline), text, token counts, finish_reason.
Run alone: python jobs/launch.py stage=generate
"""

from __future__ import annotations

from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.generation import GenerateFactory, run_rows, work_row
from cpt.parallel import n_shards
from cpt.pipeline import StageContext
from cpt.prompts import conditions, teacher_messages, teacher_no_rubric_messages


def conditions_fingerprint(cfg: CptConfig) -> list[Any]:
    """What the conditions' prompts depend on: names, levels, qualifiers, rubric content."""
    return [
        [
            c.rubric,
            c.level,
            [p.level.qualifier for p in c.parts],
            [p.rubric.content_hash() for p in c.parts],
        ]
        for c in conditions(cfg)
    ]


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
        "generate": cfg.generate,
        "seed": cfg.seed,
    }


def work_grid(cfg: CptConfig, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        for cond in conditions(cfg):
            if cond.task_tags and task["genre"] and task["genre"] not in cond.task_tags:
                continue
            msgs = teacher_messages(cfg.prompts, cfg.levels, cond, task["text"])
            for s in range(cfg.generate.samples):
                rid = store.content_hash(["gen", task["id"], cond.rubric, cond.level, s])
                rows.append(
                    work_row(
                        rid,
                        msgs,
                        cfg.seed,
                        task_id=task["id"],
                        rubric=cond.rubric,
                        level=cond.level,
                        sample_idx=s,
                        kind="rubric",
                    )
                )
        if cfg.generate.no_rubric:
            msgs = teacher_no_rubric_messages(cfg.prompts, task["text"])
            for s in range(cfg.generate.samples):
                rid = store.content_hash(["gen", task["id"], "", "", s])
                rows.append(
                    work_row(
                        rid,
                        msgs,
                        cfg.seed,
                        task_id=task["id"],
                        rubric="",
                        level="",
                        sample_idx=s,
                        kind="no_rubric",
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
    )
    return stats.as_dict()


def plan(cfg: CptConfig) -> dict[str, Any]:
    per_task = len(conditions(cfg)) + int(cfg.generate.no_rubric)
    n = per_task * cfg.generate.samples * (cfg.tasks.num_tasks or 1)
    return {"rows<=": n, "shards<=": n_shards(n, cfg.generate.shard_size)}
