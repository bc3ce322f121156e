"""bench_pipeline: where the time of the default local pipeline goes, stage by stage.

Runs the real entry point (`python jobs/launch.py run_dir=<tmp> ...`) once, then reads each
finished stage's manifest (`seconds`: the stage's own wall time, from lock to _SUCCESS) and
shows it as a share of the launch's wall time. What is left over ("outside stages") is
process start, imports, config composition and the graph walk.

    python -m benchmarks.bench_pipeline                 # the default pipeline (tiny models, Ray)
    python -m benchmarks.bench_pipeline --quick         # data stages: 2 tasks, 1 rubric, inline
    python -m benchmarks.bench_pipeline --quick --all   # every stage at the quick sizes

The quick mode runs the data stages (tasks .. pairs) at small sizes without Ray, to stay
inside the CI budget; train, evaluate and report add about a minute on 2 cores (`--all`).
Stages that the composed config cannot run (no `train` section in `CptConfig`) are left out,
and the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO, finish, md_table

QUICK = [
    # the tiny random models (the defaults run the real model); they almost never emit EOS,
    # so their generations cut at max_new_tokens are paired and judged too
    *("teacher=tiny", "judge=tiny", "student=tiny", "train=tiny", "engine=hf"),
    *("pairs.keep_truncated=true", "adherence.judge_truncated=true"),
    "evaluate.judge_truncated=true",
    "tasks.num_tasks=2",
    "rubrics.include=[concision]",
    "generate.no_rubric=false",
    "parallel.backend=inline",  # Ray start and per-stage actor model loads dominate tiny runs
    "adherence.max_attempts=1",  # the random tiny judge rarely closes its JSON: no repair rounds
]
QUICK_TRAIN = [
    "train.max_steps=2",
    "evaluate.samples=1",
    "evaluate.judge_max_attempts=1",
    "evaluate.agreement_fraction=0",
    "report.n_boot=100",
]


def _stage_manifests(run_dir: Path, stage: str) -> list[tuple[str, dict]]:
    """(label, manifest) of each finished folder of a stage (one per student for train...)."""
    from cpt import store

    found = sorted((run_dir / stage).glob("*/manifest.json")) + sorted(
        (run_dir / stage).glob("manifest.json")
    )
    if len(found) == 1:
        return [(stage, store.read_json(found[0]))]
    return [(f"{stage} {p.parent.name}", store.read_json(p)) for p in found]


def plan_cost(run_dir: Path, overrides: list[str]) -> tuple[float, int]:
    """Seconds of `pipeline.resolve` in this process (compose, stage keys, graph walk) and how
    many YAML files it parsed: the bookkeeping every launch pays before and between stages."""
    import yaml

    from benchmarks import compose
    from cpt import pipeline

    cfg = compose(f"run_dir={run_dir}", *[o for o in overrides if not o.startswith("stage=")])
    parses = 0
    safe_load = yaml.safe_load

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal parses
        parses += 1
        return safe_load(*args, **kwargs)

    yaml.safe_load = counting  # cpt.rubric calls yaml.safe_load through the module
    try:
        t = time.perf_counter()
        pipeline.resolve(cfg)
        return time.perf_counter() - t, parses
    finally:
        yaml.safe_load = safe_load


def main(
    quick: bool = False, extra: list[str] | None = None, all_stages: bool = False
) -> dict[str, Any]:
    from cpt.config import CptConfig
    from cpt.stages import STAGES

    has_train = "train" in {f.name for f in dataclasses.fields(CptConfig)}
    overrides = list(QUICK if quick else [])
    notes = []
    if has_train and quick and not all_stages:
        overrides.append("stage=pairs")
        notes.append(
            "--quick: data stages only (train, evaluate and report: full mode, or --quick --all)"
        )
    elif has_train:
        overrides += QUICK_TRAIN if quick else []
    else:
        overrides.append("stage=pairs")
        notes.append(
            "train, evaluate and report left out: CptConfig has no `train` section yet, so "
            "`python jobs/launch.py` cannot run them"
        )
    overrides += extra or []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "jobs/launch.py", f"run_dir={run_dir}", *overrides]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            errors.append(f"launch exited {proc.returncode}: {' / '.join(tail)}")
        rows = []
        for stage in STAGES:
            for label, m in _stage_manifests(run_dir, stage):
                rows.append(
                    [
                        label,
                        m.get("seconds", float("nan")),
                        m.get("rows", "-"),
                        m.get("n_shards", "-"),
                    ]
                )
        plan_s, parses = plan_cost(Path(tmp) / "plan", overrides)
        notes.append(
            f"`pipeline.resolve(cfg)` alone (compose done; stage keys + graph walk) takes {plan_s:.1f} s "
            f"here and parses {parses} rubric YAML files: part of 'outside stages', paid again "
            "for every stage a launch runs"
        )
    in_stages = sum(r[1] for r in rows)
    table = [[s, sec, sec / wall * 100, n, sh] for s, sec, n, sh in rows]
    table.append(
        [
            "outside stages (start, imports, compose)",
            wall - in_stages,
            (wall - in_stages) / wall * 100,
            "-",
            "-",
        ]
    )
    table.append(["total (launch wall time)", wall, 100.0, "-", "-"])
    shown = " ".join(o for o in overrides) or "(defaults)"
    return {
        "name": "pipeline",
        "title": "end-to-end local pipeline, time by stage",
        "header": [f"command: python jobs/launch.py run_dir=<tmp> {shown}"],
        "tables": [md_table(["stage", "seconds", "% of total", "rows", "shards"], table)],
        "notes": [
            *notes,
            "seconds per stage: the stage manifest's `seconds` (lock taken to _SUCCESS written)",
        ],
        "targets": [],
        "figures": {
            "wall_s": wall,
            "plan_s": plan_s,
            "plan_yaml_parses": parses,
            **{f"{r[0]}_s": r[1] for r in rows},
        },
        "errors": errors,
        "ok": not errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 tasks, 1 rubric, inline backend")
    ap.add_argument("--all", action="store_true", help="with --quick: every stage, not only data")
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the launch")
    ns = ap.parse_args()
    sys.exit(finish(main(ns.quick, ns.overrides, all_stages=ns.all), ns.json))
