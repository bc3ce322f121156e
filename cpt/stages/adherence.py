"""adherence: the judge scores every teacher generation against its rubric(s) (Table 2).
Reads tasks/, generate/; writes adherence/*.parquet (one row per generation and rubric:
id, gen_id, task_id, rubric, level, part_rubric, part_level, kind, score, critique, ok,
error, attempts) plus table2.parquet / table2.md: the teacher's mean judge score per target
level and for the no-rubric baseline, with judge failures counted (never scored 0).
Run alone: python jobs/launch.py stage=adherence
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cpt import store
from cpt.config import CptConfig, JudgingConfig
from cpt.generation import JudgeFactory, run_rows
from cpt.graph import StageContext, StageSpec
from cpt.judge import JUDGE_KEY, TRUNCATED, condition_parts, judge_grid
from cpt.parallel import n_shards
from cpt.prompts import generation_rows, load_selected_rubrics
from cpt.workload import JUDGE, Phase, actual, config_tasks, fake_responses, teacher_grid
from cpt.workload import estimate as phase_estimate


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "judge": cfg.judge,
        "engine": (cfg.judge.engine or cfg.engine.kind),
        "rubrics": [r.content_hash() for r in load_selected_rubrics(cfg)],
        "templates": [cfg.prompts.judge_system, cfg.prompts.judge, cfg.prompts.judge_repair],
        "prefix_layout": cfg.prompts.prefix_layout,  # the task block's own nonce
        "adherence": cfg.adherence,
        "seed": cfg.seed,
    }


def judge_factory(cfg: CptConfig, judging: JudgingConfig) -> JudgeFactory:
    return JudgeFactory(cfg.judge, cfg.engine, cfg.prompts.judge_repair, judging.max_attempts)


def work_grid(
    cfg: CptConfig,
    tasks: dict[str, str],
    gens: list[dict],
    nonce_key: bytes | None = None,
    cut_to_fit: bool = True,
) -> list[dict]:
    singles = cfg.rubrics.include or sorted(r.name for r in load_selected_rubrics(cfg))

    def parts(g: dict) -> list[tuple[str, str]]:
        if g["kind"] == "no_rubric":  # the baseline is scored against every single rubric
            return [(name, "") for name in singles]
        return condition_parts(g)

    meta = lambda g: {"kind": g["kind"]}  # noqa: E731
    return judge_grid(
        cfg, tasks, gens, "adh", parts, meta, nonce_key, cfg.adherence.judge_truncated, cut_to_fit
    )


def table2(cfg: CptConfig, rows: list[dict]) -> pa.Table:
    """Mean judge score per (teacher, rubric) and column: no rubric, then each level.

    Only single-rubric generations and the baseline enter; combos are reported per part.
    Cells are means over judged responses; failures are counted in their own column.
    """
    columns = ["no_rubric", *cfg.levels.names]
    cells: dict[tuple[str, str], list[float]] = {}
    failures: dict[str, int] = {}
    truncated: dict[str, int] = {}  # generations cut at max_new_tokens: not judged
    for r in rows:
        col = "no_rubric" if r["kind"] == "no_rubric" else r["part_level"]
        key = (r["part_rubric"], col)
        if r.get("error") == TRUNCATED:  # not judged (adherence.judge_truncated off)
            truncated[r["part_rubric"]] = truncated.get(r["part_rubric"], 0) + 1
            continue
        if not r["ok"]:
            failures[r["part_rubric"]] = failures.get(r["part_rubric"], 0) + 1
            continue
        cells.setdefault(key, []).append(r["score"])
        cells.setdefault(("ALL", col), []).append(r["score"])
    names = [*sorted({r["part_rubric"] for r in rows}), "ALL"]
    failures["ALL"] = sum(failures.values())
    truncated["ALL"] = sum(truncated.values())

    def mean(xs: list[float] | None) -> float | None:
        return round(sum(xs) / len(xs), 2) if xs else None

    data: dict[str, list] = {"teacher": [cfg.teacher.name] * len(names), "rubric": names}
    for col in columns:
        data[col] = [mean(cells.get((n, col))) for n in names]
        data[f"n_{col}"] = [len(cells.get((n, col), [])) for n in names]
    data["judge_failures"] = [failures.get(n, 0) for n in names]
    data["truncated"] = [truncated.get(n, 0) for n in names]
    return pa.table(data)


def table2_markdown(table: pa.Table, levels: list[str]) -> str:
    cols = ["no_rubric", *levels]
    head = (
        "| teacher | rubric | "
        + " | ".join(c.replace("_", " ") for c in cols)
        + " | judge failures | truncated (not judged) |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for row in table.to_pylist():
        vals = ["-" if row[c] is None else f"{row[c]:.1f} (n={row['n_' + c]})" for c in cols]
        lines.append(
            f"| {row['teacher']} | {row['rubric']} | "
            + " | ".join(vals)
            + f" | {row['judge_failures']} | {row['truncated']} |"
        )
    return "\n".join(lines) + "\n"


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tasks = {t["id"]: t["text"] for t in store.read_table(ctx.inputs["tasks"]).to_pylist()}
    gens = store.read_table(ctx.inputs["generate"]).to_pylist()
    rows = work_grid(cfg, tasks, gens, store.secret_file(ctx.out_dir / JUDGE_KEY))
    stats = run_rows(
        rows,
        ctx.out_dir,
        cfg.adherence.shard_size,
        judge_factory(cfg, cfg.adherence),
        cfg.judge,
        cfg.engine,
        cfg.parallel,
        label="adherence",
        warm=ctx.warm,
    )
    t2 = table2(cfg, store.read_shards(ctx.out_dir, stats.n_shards).to_pylist())
    store.atomic_write_parquet(ctx.out_dir / "table2.parquet", t2)
    store.atomic_write_text(ctx.out_dir / "table2.md", table2_markdown(t2, cfg.levels.names))
    truncated = sum(g["finish_reason"] == "length" for g in gens)
    return {
        **stats.as_dict(),
        "judge_failures": stats.failures,
        "truncated_generations": truncated,
        "phases": [actual(cfg, "judge", JUDGE, cfg.judge, stats, cfg.adherence.shard_size)],
    }


def plan(cfg: CptConfig) -> dict[str, Any]:
    n = generation_rows(cfg)  # one judgement per generation at most
    if n is None:
        return {"shard_size": cfg.adherence.shard_size}
    return {"rows<=": n, "shards<=": n_shards(n, cfg.adherence.shard_size)}


def estimate(cfg: CptConfig) -> list[Phase]:
    """Every generation judged (an upper bound: truncated ones may be skipped)."""
    tasks = config_tasks(cfg)
    gens = fake_responses(teacher_grid(cfg, tasks), cfg.teacher)
    rows = work_grid(cfg, {t["id"]: t["text"] for t in tasks}, gens, cut_to_fit=False)
    return [phase_estimate(cfg, "judge", JUDGE, cfg.judge, rows, cfg.adherence.shard_size)]


SPEC = StageSpec(
    "adherence", ("tasks", "generate"), params, run, plan, runs=("judge",), estimate=estimate
)
