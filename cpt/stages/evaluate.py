"""evaluate: the base student and the CPT student (base + adapter) answer every test
(task, condition) under s(R, level), N samples each; the judge scores every response
against each of its rubrics (paper Table 3, Figure 1).
Reads tasks/ (test split), sysprompts/, train/<student>/ (adapter); writes
evaluate/<student>-<key>/responses/ (student generations) and shards of judgements:
id, gen_id, student, model (base|cpt), task_id, rubric, level, part_rubric, part_level,
sample_idx, response, score, critique, ok, error, attempts.
Run alone: python jobs/launch.py stage=evaluate student=<name>
"""

from __future__ import annotations

from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.generation import GenerateFactory, JudgeFactory, run_rows
from cpt.graph import StageContext, StageSpec
from cpt.judge import JUDGE_KEY, condition_parts, judge_grid
from cpt.parallel import n_shards
from cpt.prompts import (
    conditions,
    load_selected_rubrics,
    student_messages,
)
from cpt.rows import work_row
from cpt.system_prompts import load_system_prompts, pick


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "student": cfg.student,
        "judge": cfg.judge,
        "engines": [cfg.student.engine or cfg.engine.kind, cfg.judge.engine or cfg.engine.kind],
        "rubrics": [r.content_hash() for r in load_selected_rubrics(cfg)],
        "templates": [
            cfg.prompts.student,
            cfg.prompts.judge_system,
            cfg.prompts.judge,
            cfg.prompts.judge_repair,
        ],
        "evaluate": cfg.evaluate,
        "seed": cfg.seed,
    }


def response_grid(cfg: CptConfig, tasks: list[dict], sysprompts: dict, adapter: str) -> list[dict]:
    models = {"cpt": adapter, **({"base": ""} if cfg.evaluate.baseline else {})}
    rows = []
    for task in (t for t in tasks if t["split"] == "test"):
        for cond in conditions(cfg):
            if not cond.applies_to(task["genre"]):
                continue
            system = pick(
                sysprompts[(cond.rubric, cond.level)], task["id"], cond.rubric, cond.level, cfg.seed
            )
            msgs = student_messages(cfg.prompts, system, task["text"])
            for model, adapter_path in sorted(models.items()):
                for s in range(cfg.evaluate.samples):
                    rid = store.content_hash(
                        ["eval", cfg.student.name, model, task["id"], cond.rubric, cond.level, s]
                    )
                    rows.append(
                        work_row(
                            rid,
                            msgs,
                            cfg.seed,
                            adapter=adapter_path,
                            student=cfg.student.name,
                            model=model,
                            task_id=task["id"],
                            rubric=cond.rubric,
                            level=cond.level,
                            sample_idx=s,
                        )
                    )
    return rows


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tasks = store.read_table(ctx.inputs["tasks"]).to_pylist()
    sysprompts, _ = load_system_prompts(cfg, ctx.inputs["sysprompts"])
    adapter = str(ctx.inputs["train"] / "adapter")
    responses_dir = ctx.out_dir / "responses"
    gen_rows = response_grid(cfg, tasks, sysprompts, adapter)
    gen_stats = run_rows(
        gen_rows,
        responses_dir,
        cfg.evaluate.shard_size,
        GenerateFactory(cfg.student, cfg.engine),
        cfg.student,
        cfg.engine,
        cfg.parallel,
        label=f"evaluate[{cfg.student.name}] generate",
    )
    responses = store.read_shards(responses_dir, gen_stats.n_shards).to_pylist()
    judge_rows = judge_grid(
        cfg,
        {t["id"]: t["text"] for t in tasks},
        responses,
        "evaljudge",
        condition_parts,
        lambda g: {
            "student": g["student"],
            "model": g["model"],
            "response": g["text"],
            "generation_ok": g["ok"],
        },
        store.secret_file(ctx.out_dir / JUDGE_KEY),  # delimiter nonces: secret, resumable
    )
    factory = JudgeFactory(
        cfg.judge, cfg.engine, cfg.prompts.judge_repair, cfg.evaluate.judge_max_attempts
    )
    stats = run_rows(
        judge_rows,
        ctx.out_dir,
        cfg.evaluate.shard_size,
        factory,
        cfg.judge,
        cfg.engine,
        cfg.parallel,
        label=f"evaluate[{cfg.student.name}] judge",
    )
    agreement = agreement_rows(cfg, judge_rows)
    agree_stats = run_rows(
        agreement,
        ctx.out_dir / "agreement",
        cfg.evaluate.shard_size,
        factory,
        cfg.judge,
        cfg.engine,
        cfg.parallel,
        label=f"evaluate[{cfg.student.name}] judge agreement",
    )
    return {
        **stats.as_dict(),
        "judge_failures": stats.failures,
        "responses": gen_stats.as_dict(),
        "agreement": agree_stats.as_dict(),
        "adapter": adapter,
    }


def agreement_rows(cfg: CptConfig, judge_rows: list[dict]) -> list[dict]:
    """A seeded share of the judgements again, with another sampling seed (same prompt)."""
    frac = cfg.evaluate.agreement_fraction
    chosen = [
        r
        for r in judge_rows
        if int(store.content_hash(["agree", r["id"], cfg.seed], 8), 16) / 16**8 < frac
    ]
    return [
        {
            **r,
            "id": store.content_hash(["agree", r["id"]]),
            "first_id": r["id"],
            "seed": (r["seed"] + 7919) & 0x7FFFFFFF,
        }
        for r in chosen
    ]


def plan(cfg: CptConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"samples": cfg.evaluate.samples, "student": cfg.student.name}
    if cfg.tasks.num_tasks:  # responses of base and tuned student over (at most) every task
        models = 1 + int(cfg.evaluate.baseline)
        n = len(conditions(cfg)) * cfg.evaluate.samples * models * cfg.tasks.num_tasks
        info["shards<="] = n_shards(n, cfg.evaluate.shard_size)
    return info


SPEC = StageSpec(
    "evaluate",
    ("tasks", "sysprompts", "train"),
    params,
    run,
    plan,
    per_student=True,
    runs=("student", "judge"),  # one after the other: the job is sized for the larger
)
