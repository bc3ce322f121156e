"""Running the stage graph: resolve the plan once, then run it here or hand it to Slurm.

`resolve(cfg)` is the one `cpt.graph.RunPlan` of a launch (keys, folders, done-states);
the local runner below, the Slurm submitter (`cpt.slurm`, handed the plan and
`run_stage`), `plan=true` and `stage=status` all read it. A stage's unfinished inputs run
first; a finished stage is skipped.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cpt import planner, store
from cpt.commands.check import run_check
from cpt.commands.status import print_status
from cpt.config import ConfigError, CptConfig, StageName, resolve_recipe, validate
from cpt.graph import (
    TRAIN,
    Node,
    RunPlan,
    StageContext,
    StageSpec,
    format_work,
    profile_problems,
    replica_gpus,
)
from cpt.graph import resolve as resolve_graph
from cpt.replicas import check_gpus
from cpt.stages import STAGES
from cpt.warm import WarmEngines

log = logging.getLogger(__name__)


@functools.cache
def stage_specs() -> dict[str, StageSpec]:
    """The registry: each stage module's `SPEC`, in pipeline order (imported on first use:
    stage modules pull in heavy libraries)."""
    specs = {name: importlib.import_module(f"cpt.stages.{name}").SPEC for name in STAGES}
    wrong = [n for n, s in specs.items() if s.name != n]
    if wrong:
        raise ValueError(f"cpt/stages: SPEC.name differs from the module name for {wrong}")
    return specs


def resolve(cfg: CptConfig) -> RunPlan:
    """The plan of one launch (every stage's key, folder and done-state, computed once),
    with `train=auto` resolved to the recipe this hardware trains with."""
    return resolve_graph(resolve_recipe(cfg)[0], stage_specs())


def stage_dir(cfg: CptConfig, name: str) -> Path:
    """The output folder of stage `name` for this config (resolves a whole plan: for tools
    and tests; code that has a plan reads `plan[name].folder`)."""
    return resolve(cfg)[name].folder


def config_dict(cfg: CptConfig) -> dict[str, Any]:
    """The composed config as plain JSON-able data, secrets redacted."""
    return store.redact(store._canonical(cfg))


def _run_node(plan: RunPlan, node: Node, inputs: dict[str, Path], warm: WarmEngines) -> Path:
    """Run one stage under its lock and write its manifest (re-checked under the lock:
    another launch may have finished it since the plan was resolved). Warm engines are
    closed before a stage that trains: training needs their memory."""
    cfg, spec, out = plan.cfg, node.spec, node.folder
    with store.stage_lock(out):
        if not spec.always_run and store.is_done(out):
            return out
        log.info("stage %s: running -> %s", node.name, out)
        started = time.time()
        if TRAIN in spec.runs:
            warm.close_all(f"stage {node.name} trains")
        warm.begin(node.name)
        ctx = StageContext(
            cfg=cfg, name=node.name, key=node.key, out_dir=out, inputs=inputs, warm=warm
        )
        stats = spec.run(ctx)
        ended = time.time()
        phases = stats.get("phases", [])
        manifest = {
            "stage": node.name,
            "key": node.key,
            "params": spec.params(cfg),
            "inputs": {dep: {"key": plan[dep].key, "dir": str(p)} for dep, p in inputs.items()},
            "config": config_dict(cfg),
            "versions": store.package_versions(),
            "git": store.git_commit(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "argv": sys.argv,
            **{("work_seconds" if k == "seconds" else k): v for k, v in stats.items()},
            **warm.report(),  # engines loaded or reused (from which stage), load seconds
            # the stage's wall time, as the run log says it (a stage's own `seconds`, e.g.
            # the runner's, is kept as work_seconds rather than shadowing it)
            "started": started,
            "ended": ended,
            "seconds": round(ended - started, 3),
            # the planner's: what was predicted at launch, what this run measured, where
            "device": planner.device(cfg),
            "predicted": planner.read_prediction(plan.run_dir, node.key),
            "actual": {
                "seconds": round(ended - started, 3),
                "prompt_tokens": sum(p["prompt_tokens"] for p in phases),
                "completion_tokens": sum(p["completion_tokens"] for p in phases),
            },
        }
        manifest.setdefault("n_shards", 0)
        store.mark_done(out, manifest)
        log.info(
            "stage %s: finished in %.1f s (%s rows)",
            node.name,
            ended - started,
            stats.get("rows", "-"),
        )
    return out


def run_plan(plan: RunPlan) -> list[Path]:
    """Run the selected stages in order (inputs first); finished ones are skipped."""
    cfg = plan.cfg
    wanted = getattr(cfg.stage, "value", None)
    outs = []
    warm = WarmEngines(enabled=cfg.parallel.warm)  # engines kept from stage to stage
    try:
        for node in plan.selected_nodes():
            explicit = wanted == node.name
            if node.done and not node.always_run:
                (log.info if wanted is None or explicit else log.debug)(
                    "stage %s: done already (%s), skipping", node.name, node.folder
                )
                outs.append(node.folder)
                continue
            # an explicitly requested view (stage=report) renders what exists, computing nothing
            render_only = node.always_run and explicit
            inputs = {} if render_only else {dep: plan[dep].folder for dep in node.needs}
            outs.append(_run_node(plan, node, inputs, warm))
    finally:  # the end of the run, or an error: no replica outlives it
        warm.close_all("the run is over")
    return outs


def run_stage(cfg: CptConfig, name: str) -> Path:
    """Run one stage whose inputs are done, e.g. inside its Slurm job (resumes: finished
    shards are kept). Raises StoreError naming the inputs that are not done."""
    plan = resolve(cfg)
    node = plan[name]
    if node.done and not node.always_run:
        log.info("stage %s: done already (%s), skipping", name, node.folder)
        return node.folder
    missing = [dep for dep in node.needs if not plan[dep].done]
    if missing and not node.always_run:  # (a view like report renders what exists)
        raise store.StoreError(
            f"stage {name}: inputs {missing} are not done although this job ran after "
            "their jobs; see their logs (`stage=status`)"
        )
    inputs = {dep: plan[dep].folder for dep in node.needs if plan[dep].done}
    if int(os.environ.get("RANK", "0")) > 0:
        # another rank of a multi-task job (training): it does its share of the work; rank 0
        # holds the stage's lock, writes the outputs, the manifest and _SUCCESS
        node.spec.run(
            StageContext(cfg=cfg, name=name, key=node.key, out_dir=node.folder, inputs=inputs)
        )
        return node.folder
    warm = WarmEngines(enabled=cfg.parallel.warm)  # within the stage (evaluate: student, judge)
    try:
        return _run_node(plan, node, inputs, warm)
    finally:
        warm.close_all("the stage is over")


def plan_text(plan: RunPlan, predictions: dict[str, planner.Prediction]) -> str:
    """What `run` would do, as a table: stage, status, work, output folder; then each
    stage's predicted tokens, wall time and GPU-hours."""
    lines = [
        f"run_dir: {plan.run_dir}",
        f"{'stage':<12}{'status':<9}{'work':<34}folder",
    ]
    for node in plan.selected_nodes():
        status = "done" if node.done else "pending"
        work = format_work(node.spec.plan(plan.cfg))
        lines.append(f"{node.name:<12}{status:<9}{work:<34}{node.folder.relative_to(plan.run_dir)}")
    lines += planner.prediction_lines(predictions, planner.device(plan.cfg))
    return "\n".join(lines)


def probe(cfg: CptConfig) -> None:
    """`plan=probe`: the same stages, small and real, in `<run_dir>/.cpt/probe` (here, or
    as Slurm jobs waited for), so their manifests calibrate the planner; the real run folder
    is left alone. Small: two tasks (one to train on, one to test: every stage keeps the
    data the next needs; a stage cut to its first shard could leave training no pair),
    training at most 2 steps. Shard and batch sizes stay as configured, so the probe's
    shards are shaped like the run's (a few per stage) and their rates carry over."""
    import dataclasses as dc

    steps = 2 if cfg.train.max_steps < 1 else min(cfg.train.max_steps, 2)
    probe_cfg = dc.replace(
        cfg,
        run_dir=str(planner.probe_dir(cfg.run_dir)),
        plan=False,
        wait=True,
        tasks=dc.replace(cfg.tasks, num_tasks=min(cfg.tasks.num_tasks or 2, 2)),
        train=dc.replace(cfg.train, max_steps=steps),
        planner=dc.replace(cfg.planner, table=str(planner.table_path(cfg))),
    )
    log.info("plan=probe: every stage on 2 tasks in %s", probe_cfg.run_dir)
    try:
        run(probe_cfg)
    except store.StoreError as exc:  # e.g. neither task fits a rubric's genres: no pairs
        raise store.StoreError(
            f"plan=probe: {exc}; calibrate from a finished run instead "
            "(planner.learn_from=[<run_dir>])"
        ) from exc


def run(cfg: CptConfig) -> list[Path]:
    """Entry point from jobs/launch.py: validate, then plan, check, status or run stages."""
    problems = validate(cfg)
    if cfg.stage is StageName.check:
        run_check(cfg, problems)
        return []
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.stage is StageName.status:
        print_status(resolve(cfg))
        return []
    cfg, recipe = resolve_recipe(cfg)
    if cfg.plan == "probe":
        probe(cfg)
    plan = resolve(cfg)  # (train=auto is resolved already: the same plan as status's)
    predictions = planner.predict_plan(plan)
    trains = any(n.name == "train" and not n.done for n in plan.selected_nodes())
    # models the stages to run serve through engines, e.g. {"teacher"}: checked for GPUs
    roles = {r for n in plan.selected_nodes() if not n.done for r in n.spec.runs if r != TRAIN}
    if cfg.cluster.name != "local" and not os.environ.get("CPT_STAGE_JOB"):
        from cpt import slurm  # a Slurm profile: one job per stage, chained by afterok

        problems = profile_problems(cfg, roles)
        if problems:
            raise ConfigError("; ".join(problems))
        if cfg.plan:
            print(recipe)  # before the jobs: their last line is the GPU-hours total
            print(slurm.plan_jobs(plan, predictions))
            return []
        if trains:
            log.info("%s", recipe)
        planner.save_predictions(plan, predictions)
        return [s.out_dir for s in slurm.submit_pipeline(plan, run_stage)]
    if cfg.plan:
        print(recipe)
        print(plan_text(plan, predictions))
        return []
    # a model asking for more GPUs than there are: an error now, not Ray waiting forever
    problems = check_gpus(
        {f"{r}.gpus": replica_gpus(cfg, r) for r in sorted(roles)},
        cfg.parallel.address if cfg.parallel.backend == "ray" else "",
    )
    if problems:
        raise ConfigError("; ".join(problems))
    if trains:
        log.info("%s", recipe)
    planner.save_predictions(plan, predictions)
    outs = run_plan(plan)
    if "report" in plan.selected:
        print(report_summary(plan["report"].folder))
    return outs


def report_summary(folder: Path) -> str:
    """The last lines of a run: where the report is and its Table 3 numbers."""
    manifest = store.read_json(folder / "manifest.json")
    lines = [f"report: {manifest.get('report', folder / 'report.md')}"]
    lines += [f"  {line}" for line in manifest.get("headline", [])]
    if len(lines) == 1:
        lines.append("  (no finished evaluation yet)")
    return "\n".join(lines)
