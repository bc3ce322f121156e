"""The stage graph: what each stage needs, what determines its output, and running it.

Each stage is a pure function of (its parameters, its inputs) -> an output folder keyed
by a hash of both (`stage_key`). So a sweep over students reuses one data generation, a
finished stage is skipped, and two configs that differ only in a student share every data
stage. `run` executes the selected stage(s) in order; a stage's missing inputs run first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt import store
from cpt.config import ConfigError, CptConfig, StageName, validate

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage's `run` gets: the config, its output folder and its input folders."""

    cfg: CptConfig
    name: str
    key: str
    out_dir: Path
    inputs: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    """A node of the graph.

    params: the values (besides the inputs' keys) that determine the output; hashed.
    run: does the work, writes shards under ctx.out_dir, returns stats for the manifest.
    per_student: the output depends on the student (one folder per student, labelled).
    version: bump when the stage's logic changes, so old outputs are not reused.
    """

    name: str
    needs: tuple[str, ...]
    params: Callable[[CptConfig], Any]
    run: Callable[[StageContext], dict[str, Any]]
    plan: Callable[[CptConfig], dict[str, Any]] = lambda cfg: {}
    per_student: bool = False
    gpu: bool = False
    version: int = 1
    always_run: bool = False  # cheap views of other stages (report): one folder, re-rendered


def stage_specs() -> dict[str, StageSpec]:
    """Stages in pipeline order (imported lazily: stage modules pull in heavy libraries)."""
    from cpt.stages import REGISTRY

    return REGISTRY


def pipeline_order() -> list[str]:
    return list(stage_specs())


def stage_key(cfg: CptConfig, name: str) -> str:
    spec = stage_specs()[name]
    return store.content_hash(
        {
            "stage": name,
            "version": spec.version,
            "params": spec.params(cfg),
            "inputs": {dep: stage_key(cfg, dep) for dep in spec.needs},
        }
    )


def stage_dir(cfg: CptConfig, name: str) -> Path:
    spec = stage_specs()[name]
    if spec.always_run:
        return Path(cfg.run_dir).absolute() / name
    label = cfg.student.name if spec.per_student else ""
    return store.Store(cfg.run_dir).stage_dir(name, stage_key(cfg, name), label)


def config_dict(cfg: CptConfig) -> dict[str, Any]:
    """The composed config as plain JSON-able data, secrets redacted."""
    return store.redact(store._canonical(cfg))


def run_stage(cfg: CptConfig, name: str) -> Path:
    """Run one stage (its unfinished inputs first); a finished stage is a no-op."""
    spec = stage_specs()[name]
    out = stage_dir(cfg, name)
    explicit = cfg.stage is not None and cfg.stage.value == name
    if store.is_done(out) and not spec.always_run:
        (log.info if cfg.stage is None or explicit else log.debug)(
            "stage %s: done already (%s), skipping", name, out
        )
        return out
    # an explicitly requested view (stage=report) renders what exists, computing nothing
    render_only = spec.always_run and explicit
    inputs = {} if render_only else {dep: run_stage(cfg, dep) for dep in spec.needs}
    with store.stage_lock(out):
        if store.is_done(out) and not spec.always_run:  # finished by another launch meanwhile
            return out
        log.info("stage %s: running -> %s", name, out)
        started = time.time()
        ctx = StageContext(cfg=cfg, name=name, key=stage_key(cfg, name), out_dir=out, inputs=inputs)
        stats = spec.run(ctx)
        ended = time.time()
        manifest = {
            "stage": name,
            "key": ctx.key,
            "params": spec.params(cfg),
            "inputs": {
                dep: {"key": stage_key(cfg, dep), "dir": str(p)} for dep, p in inputs.items()
            },
            "config": config_dict(cfg),
            "versions": store.package_versions(),
            "git": store.git_commit(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "argv": sys.argv,
            "started": started,
            "ended": ended,
            "seconds": round(ended - started, 3),
            **stats,
        }
        manifest.setdefault("n_shards", 0)
        store.mark_done(out, manifest)
        log.info(
            "stage %s: finished in %.1f s (%s rows)", name, ended - started, stats.get("rows", "-")
        )
    return out


def plan(cfg: CptConfig) -> str:
    """What `run` would do, as a table: stage, status, output folder and its shards."""
    lines = [
        f"run_dir: {Path(cfg.run_dir).absolute()}",
        f"{'stage':<12}{'status':<9}{'work':<34}folder",
    ]
    for name in selected_stages(cfg):
        out = stage_dir(cfg, name)
        status = "done" if store.is_done(out) else "pending"
        info = stage_specs()[name].plan(cfg)
        work = ", ".join(f"{k}={v}" for k, v in info.items())
        lines.append(
            f"{name:<12}{status:<9}{work:<34}{out.relative_to(Path(cfg.run_dir).absolute())}"
        )
    return "\n".join(lines)


def selected_stages(cfg: CptConfig) -> list[str]:
    """The stage named by `stage=`, with its unfinished inputs; all stages by default."""
    if cfg.stage is None:
        return pipeline_order()
    wanted = {cfg.stage.value}
    specs = stage_specs()
    if specs[cfg.stage.value].always_run:
        return [cfg.stage.value]
    frontier = [cfg.stage.value]
    while frontier:
        for dep in specs[frontier.pop()].needs:
            if dep not in wanted and not store.is_done(stage_dir(cfg, dep)):
                wanted.add(dep)
                frontier.append(dep)
    return [s for s in pipeline_order() if s in wanted]


def run(cfg: CptConfig) -> list[Path]:
    """Entry point from jobs/launch.py: validate, then plan, check, status or run stages."""
    problems = validate(cfg)
    if cfg.stage is StageName.check:
        from cpt.stages.check import run_check

        run_check(cfg, problems)
        return []
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.stage is StageName.status:
        from cpt.stages.status import print_status

        print_status(cfg)
        return []
    if cfg.cluster.name != "local" and not os.environ.get("CPT_STAGE_JOB"):
        from cpt import slurm  # a Slurm profile: one job per stage, chained by afterok

        if cfg.plan:
            print(slurm.plan_jobs(cfg))
            return []
        return [s.out_dir for s in slurm.submit_pipeline(cfg)]
    if cfg.plan:
        print(plan(cfg))
        return []
    return [run_stage(cfg, name) for name in selected_stages(cfg)]


def replace(cfg: CptConfig, **changes: Any) -> CptConfig:
    """A copy of cfg with top-level fields changed (e.g. another student)."""
    return dataclasses.replace(cfg, **changes)
