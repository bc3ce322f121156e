"""evaluate: the base student and the CPT student answer every test (task, condition)
under s(R, level), N samples each; the judge (and each judge of a panel) scores every
response against each of its rubrics (paper Table 3, Figure 1).
The CPT student is the student + the adapter of train/ by default, or an external model
(`evaluate.tuned`: a PEFT adapter folder, or a full checkpoint such as the paper's
released models), in which case no train stage is needed.
Reads tasks/ (test split), sysprompts/, train/<student>/ (adapter); writes
evaluate/<student>-<key>/responses/ (student generations; responses_cpt/ for a full
external checkpoint), shards of the main judge's judgements (id, gen_id, student, model
(base|cpt), task_id, rubric, level, part_rubric, part_level, sample_idx, response, score,
critique, ok, error, attempts), panel/<judge>/ shards for each extra judge (`judges`), and
agreement/ (a share judged again, see `evaluate.agreement_*`).
Run alone: python jobs/launch.py stage=evaluate student=<name>
External:  python jobs/launch.py stage=evaluate student=qwen3_4b evaluate.tuned=<path or id>
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cpt import store
from cpt.config import CptConfig, ModelConfig
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
from cpt.workload import GENERATE, JUDGE, Phase, actual, config_tasks, fake_responses
from cpt.workload import estimate as phase_estimate


def panel(cfg: CptConfig) -> dict[str, ModelConfig]:
    """The judges of the evaluation: `judge` first, then each of `judges` by its key."""
    extra = {k: v for k, v in cfg.judges.items() if k != cfg.judge.name}
    return {cfg.judge.name: cfg.judge, **extra}


def tuned_kind(path: str) -> str:
    """`adapter` for a local PEFT adapter folder, else `full` (a checkpoint folder or hub id)."""
    if not path:
        return ""
    return "adapter" if (Path(path).expanduser() / "adapter_config.json").is_file() else "full"


def tuned_model(cfg: CptConfig) -> ModelConfig:
    """The external full checkpoint as a model: the student's settings, its own path."""
    return dataclasses.replace(cfg.student, name=f"{cfg.student.name}-cpt", path=cfg.evaluate.tuned)


def _folder_hash(path: str) -> str:
    """Content of a local adapter folder: a changed adapter is a new evaluation."""
    root = Path(path).expanduser()
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return store.content_hash([[str(f.relative_to(root)), store.file_sha256(f)] for f in files])


def params(cfg: CptConfig) -> dict[str, Any]:
    tuned = cfg.evaluate.tuned
    return {
        "student": cfg.student,
        "judge": cfg.judge,
        "judges": {k: v for k, v in panel(cfg).items() if k != cfg.judge.name},
        "tuned": _folder_hash(tuned) if tuned_kind(tuned) == "adapter" else tuned,
        "engines": [cfg.student.engine or cfg.engine.kind, cfg.judge.engine or cfg.engine.kind],
        "rubrics": [r.content_hash() for r in load_selected_rubrics(cfg)],
        "templates": [
            cfg.prompts.student,
            cfg.prompts.judge_system,
            cfg.prompts.judge,
            cfg.prompts.judge_repair,
        ],
        "prefix_layout": cfg.prompts.prefix_layout,  # the judge's task block's own nonce
        "evaluate": cfg.evaluate,
        "seed": cfg.seed,
    }


def response_grid(
    cfg: CptConfig, tasks: list[dict], sysprompts: dict, adapter: str, models: tuple[str, ...]
) -> list[dict]:
    """Student rows of `models` ("base", "cpt"); "cpt" rows carry `adapter` (may be "")."""
    models = {m: adapter if m == "cpt" else "" for m in models}
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


def _generate(ctx: StageContext, rows: list[dict], out_dir: Path, model: ModelConfig, what: str):
    cfg = ctx.cfg
    stats = run_rows(
        rows,
        out_dir,
        cfg.evaluate.shard_size,
        GenerateFactory(model, cfg.engine),
        model,
        cfg.engine,
        cfg.parallel,
        label=f"evaluate[{cfg.student.name}] generate {what}",
        warm=ctx.warm,
    )
    return stats, store.read_shards(out_dir, stats.n_shards).to_pylist()


def _judge(ctx: StageContext, judge: ModelConfig, rows: list[dict], out_dir: Path, what: str):
    cfg = ctx.cfg
    factory = JudgeFactory(
        judge, cfg.engine, cfg.prompts.judge_repair, cfg.evaluate.judge_max_attempts
    )
    return run_rows(
        rows,
        out_dir,
        cfg.evaluate.shard_size,
        factory,
        judge,
        cfg.engine,
        cfg.parallel,
        label=f"evaluate[{cfg.student.name}] {what}",
        warm=ctx.warm,
    )


def _judge_rows(
    cfg: CptConfig,
    tasks: list[dict],
    responses: list[dict],
    key: bytes | None,
    cut_to_fit: bool = True,
):
    return judge_grid(
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
        key,
        cfg.evaluate.judge_truncated,
        cut_to_fit,
    )


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    tasks = store.read_table(ctx.inputs["tasks"]).to_pylist()
    sysprompts, _ = load_system_prompts(cfg, ctx.inputs["sysprompts"])
    kind = tuned_kind(cfg.evaluate.tuned)
    adapter = cfg.evaluate.tuned if kind == "adapter" else ""
    if not kind:
        adapter = str(ctx.inputs["train"] / "adapter")
    models = ("base", "cpt") if cfg.evaluate.baseline else ("cpt",)
    shard = cfg.evaluate.shard_size
    if kind == "full":  # another model: its own engine, its own response shards
        base_stats, responses = _generate(
            ctx,
            response_grid(cfg, tasks, sysprompts, "", tuple(m for m in models if m != "cpt")),
            ctx.out_dir / "responses",
            cfg.student,
            "base",
        )
        cpt_stats, cpt_responses = _generate(
            ctx,
            response_grid(cfg, tasks, sysprompts, "", ("cpt",)),
            ctx.out_dir / "responses_cpt",
            tuned_model(cfg),
            f"cpt ({cfg.evaluate.tuned})",
        )
        responses += cpt_responses
        gen_stats = {"base": base_stats.as_dict(), "cpt": cpt_stats.as_dict()}
        phases = [
            actual(cfg, "student", GENERATE, cfg.student, base_stats, shard),
            actual(cfg, "student:cpt", GENERATE, tuned_model(cfg), cpt_stats, shard),
        ]
    else:
        stats, responses = _generate(
            ctx,
            response_grid(cfg, tasks, sysprompts, adapter, models),
            ctx.out_dir / "responses",
            cfg.student,
            "base + cpt",
        )
        gen_stats = stats.as_dict()
        phases = [actual(cfg, "student", GENERATE, cfg.student, stats, shard)]
    # delimiter nonces: secret, resumable
    judge_rows = _judge_rows(cfg, tasks, responses, store.secret_file(ctx.out_dir / JUDGE_KEY))
    stats = _judge(ctx, cfg.judge, judge_rows, ctx.out_dir, f"judge {cfg.judge.name}")
    judges = panel(cfg)
    extra = {
        name: _judge(ctx, judge, judge_rows, ctx.out_dir / "panel" / name, f"judge {name}")
        for name, judge in judges.items()
        if name != cfg.judge.name
    }
    temp = cfg.evaluate.agreement_temperature
    again = cfg.judge
    if temp is not None:
        again = dataclasses.replace(
            cfg.judge, sampling=dataclasses.replace(cfg.judge.sampling, temperature=temp)
        )
    agree_stats = _judge(
        ctx, again, agreement_rows(cfg, judge_rows), ctx.out_dir / "agreement", "judge again"
    )
    return {
        **stats.as_dict(),
        "judge_failures": stats.failures,
        "responses": gen_stats,
        "panel": {name: s.as_dict() for name, s in extra.items()},
        "truncated_responses": sum(r["finish_reason"] == "length" for r in responses),
        "agreement": agree_stats.as_dict(),
        "agreement_temperature": again.sampling.temperature,
        "adapter": adapter,
        "tuned": cfg.evaluate.tuned,
        "phases": [
            *phases,
            actual(cfg, "judge", JUDGE, cfg.judge, stats, shard),
            *(actual(cfg, f"judge:{n}", JUDGE, judges[n], s, shard) for n, s in extra.items()),
            actual(cfg, "judge:agreement", JUDGE, again, agree_stats, shard),
        ],
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
    out: dict[str, Any] = {"samples": cfg.evaluate.samples, "student": cfg.student.name}
    if len(panel(cfg)) > 1:
        out["judges"] = "+".join(panel(cfg))
    if cfg.evaluate.tuned:
        out["cpt"] = f"{tuned_kind(cfg.evaluate.tuned)}:{cfg.evaluate.tuned}"
    if cfg.tasks.num_tasks:  # responses of base and tuned student over (at most) every task
        models = 1 + int(cfg.evaluate.baseline)
        n = len(conditions(cfg)) * cfg.evaluate.samples * models * cfg.tasks.num_tasks
        out["shards<="] = n_shards(n, cfg.evaluate.shard_size)
    return out


def estimate(cfg: CptConfig) -> list[Phase]:
    """The students' responses, then every judge's judgements of them (upper bounds:
    truncated responses may be skipped); the same grids `run` builds."""
    tasks = config_tasks(cfg)
    words = " ".join(["word"] * cfg.teacher.sampling.max_new_tokens)
    sysprompts = {(c.rubric, c.level): [words] for c in conditions(cfg)}
    models = ("base", "cpt") if cfg.evaluate.baseline else ("cpt",)
    responses = response_grid(cfg, tasks, sysprompts, "", models)
    stand_ins = fake_responses(responses, cfg.student)
    judge_rows = _judge_rows(cfg, tasks, stand_ins, None, cut_to_fit=False)
    judges = panel(cfg)
    again = agreement_rows(cfg, judge_rows)
    shard = cfg.evaluate.shard_size
    return [
        phase_estimate(cfg, "student", GENERATE, cfg.student, responses, shard),
        phase_estimate(cfg, "judge", JUDGE, cfg.judge, judge_rows, shard),
        *(
            phase_estimate(cfg, f"judge:{n}", JUDGE, j, judge_rows, shard)
            for n, j in judges.items()
            if n != cfg.judge.name
        ),
        phase_estimate(cfg, "judge:agreement", JUDGE, cfg.judge, again, shard),
    ]


def skip(cfg: CptConfig) -> tuple[str, ...]:
    """An external CPT model (`evaluate.tuned`) needs no train stage."""
    return ("train",) if cfg.evaluate.tuned else ()


SPEC = StageSpec(
    "evaluate",
    ("tasks", "sysprompts", "train"),
    params,
    run,
    plan,
    per_student=True,
    skip=skip,
    runs=("student", "judge"),  # one after the other: the job is sized for the larger
    estimate=estimate,
)
