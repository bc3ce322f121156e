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
from cpt.prompts import conditions_fingerprint, generation_rows
from cpt.workload import GENERATE, Phase, actual, config_tasks, teacher_grid
from cpt.workload import estimate as phase_estimate


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


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tasks = store.read_table(ctx.inputs["tasks"]).to_pylist()
    rows = teacher_grid(cfg, tasks)
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
    return {
        **stats.as_dict(),
        "phases": [actual(cfg, "teacher", GENERATE, cfg.teacher, stats, cfg.generate.shard_size)],
    }


def plan(cfg: CptConfig) -> dict[str, Any]:
    n = generation_rows(cfg)
    if n is None:
        return {"tasks": "all"}
    return {"rows<=": n, "shards<=": n_shards(n, cfg.generate.shard_size)}


def estimate(cfg: CptConfig) -> list[Phase]:
    rows = teacher_grid(cfg, config_tasks(cfg))
    shard = cfg.generate.shard_size
    return [phase_estimate(cfg, "teacher", GENERATE, cfg.teacher, rows, shard)]


SPEC = StageSpec("generate", ("tasks",), params, run, plan, runs=("teacher",), estimate=estimate)
