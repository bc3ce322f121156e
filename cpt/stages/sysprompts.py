"""sysprompts: s = summarize(R, level) by the teacher, for every condition (x paraphrases).
Reads nothing but the config; writes sysprompts/*.parquet: id, rubric, level, paraphrase,
text (the system prompt), token counts.
Run alone: python jobs/launch.py stage=sysprompts
"""

from __future__ import annotations

from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.generation import GenerateFactory, run_rows
from cpt.graph import StageContext, StageSpec
from cpt.parallel import n_shards
from cpt.prompts import conditions, conditions_fingerprint, summarizer_messages
from cpt.rows import work_row
from cpt.workload import GENERATE, Phase, actual
from cpt.workload import estimate as phase_estimate


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "teacher": cfg.teacher,
        "engine": (cfg.teacher.engine or cfg.engine.kind),
        "conditions": conditions_fingerprint(cfg),
        "levels": cfg.levels,
        "template": cfg.prompts.summarizer,
        "sysprompts": cfg.sysprompts,
        "seed": cfg.seed,
    }


def work_grid(cfg: CptConfig) -> list[dict[str, Any]]:
    """One summarizer request per (condition, paraphrase)."""
    rows = []
    for cond in conditions(cfg):
        for k in range(cfg.sysprompts.paraphrases):
            rid = store.content_hash(["sys", cond.rubric, cond.level, k])
            rows.append(
                work_row(
                    rid,
                    summarizer_messages(cfg.prompts, cfg.levels, cond, k),
                    cfg.seed,
                    rubric=cond.rubric,
                    level=cond.level,
                    paraphrase=k,
                )
            )
    return rows


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    rows = work_grid(cfg)
    stats = run_rows(
        rows,
        ctx.out_dir,
        cfg.sysprompts.shard_size,
        GenerateFactory(cfg.teacher, cfg.engine),
        cfg.teacher,
        cfg.engine,
        cfg.parallel,
        label="sysprompts",
        warm=ctx.warm,
    )
    return {
        **stats.as_dict(),
        "phases": [actual(cfg, "teacher", GENERATE, cfg.teacher, stats, cfg.sysprompts.shard_size)],
    }


def plan(cfg: CptConfig) -> dict[str, Any]:
    n = len(conditions(cfg)) * cfg.sysprompts.paraphrases
    return {"rows": n, "shards": n_shards(n, cfg.sysprompts.shard_size)}


def estimate(cfg: CptConfig) -> list[Phase]:
    shard = cfg.sysprompts.shard_size
    return [phase_estimate(cfg, "teacher", GENERATE, cfg.teacher, work_grid(cfg), shard)]


SPEC = StageSpec("sysprompts", (), params, run, plan, runs=("teacher",), estimate=estimate)
