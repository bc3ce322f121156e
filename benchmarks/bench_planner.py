"""bench_planner: the GPU-hour planner's predicted vs actual wall time per stage, after one
calibration run (`plan=probe`: every stage small and real), on the CI Slurm cluster.

One launch calibrates (`plan=probe` in `<run_dir>/.cpt/probe`: two tasks, the configured
shard sizes, training 2 steps); the next runs the whole pipeline in the same run folder, each stage's
manifest holding what the planner predicted at launch and what the stage took. The figure is
the per-stage error (predicted - actual) / actual; target: every stage within +-25 %. A stage
shorter than 2 s is judged by its absolute error instead (within 0.5 s): a ratio of two
sub-second times is noise, and such a stage is no share of a GPU budget.

    python -m benchmarks.bench_planner            # Slurm (cluster=ci) when it answers, else local
    python -m benchmarks.bench_planner --quick    # the local runner, the small config (~1.5 min)

The full mode also runs the same work a second time (another seed) and prints how far a
stage's time moves by itself: on a shared machine that noise floor, not the planner, bounds
how close any prediction can be.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import REPO, finish, md_table

TOLERANCE = 0.25
SHORT_S, SHORT_ABS_S = 2.0, 0.5  # stages under 2 s: within 0.5 s instead of a ratio

TINY = [
    *("teacher=tiny", "judge=tiny", "student=tiny", "train=tiny", "engine=hf"),
    *("pairs.keep_truncated=true", "adherence.judge_truncated=true"),
    "evaluate.judge_truncated=true",
    "parallel.backend=inline",
    "rubrics.include=[concision]",
    "generate.no_rubric=false",
    "adherence.max_attempts=1",
    "evaluate.judge_max_attempts=1",
    "evaluate.baseline=false",
    "report.n_boot=10",
    "train.grad_accum=1",
]
QUICK = [
    "tasks.num_tasks=3",
    "tasks.test_fraction=0.34",
    "teacher.sampling.max_new_tokens=16",
    "judge.sampling.max_new_tokens=32",
    "student.sampling.max_new_tokens=16",
    "generate.shard_size=4",
    "adherence.shard_size=4",
    "train.max_steps=2",
    "train.save_steps=2",
    "evaluate.samples=1",
    "evaluate.agreement_fraction=0.5",
]
FULL = [
    "tasks.num_tasks=6",
    "tasks.test_fraction=0.34",
    "teacher.sampling.max_new_tokens=48",
    "judge.sampling.max_new_tokens=48",
    "student.sampling.max_new_tokens=48",
    "generate.shard_size=4",
    "adherence.shard_size=4",
    "evaluate.shard_size=4",
    "train.max_steps=8",
    "train.save_steps=8",
    "evaluate.samples=2",
    "evaluate.agreement_fraction=0.25",
]
STAGES = ("tasks", "generate", "sysprompts", "adherence", "pairs", "train", "evaluate", "report")


def slurm_up() -> bool:
    return (
        shutil.which("sbatch") is not None
        and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    )


def launch(*args: str) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "launch.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"launch {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout


def stage_manifests(run_dir: Path) -> dict[str, dict]:
    from cpt import store

    out = {}
    for name in STAGES:
        for m in (*run_dir.glob(f"{name}/*/manifest.json"), *run_dir.glob(f"{name}/manifest.json")):
            out[name] = store.read_json(m)
    return out


def load_avg() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def within(pred: float | None, actual: float) -> bool:
    if pred is None:
        return False
    if actual < SHORT_S:
        return abs(pred - actual) <= SHORT_ABS_S
    return abs(pred - actual) <= TOLERANCE * actual


def main(quick: bool, where: str, rerun: bool) -> dict:
    use_slurm = where == "slurm" or (where == "auto" and not quick and slurm_up())
    over = [*TINY, *(QUICK if quick else FULL)]
    if use_slurm:
        over += ["cluster=ci", "wait=true"]
    again: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_planner-") as tmp:
        run_dir = Path(tmp) / "run"
        probe_s, plan_out = launch(f"run_dir={run_dir}", "plan=probe", *over)
        run_s, _ = launch(f"run_dir={run_dir}", *over)
        ran = stage_manifests(run_dir)
        if rerun:  # the same work again (another seed): how far a stage's time moves alone
            launch(f"run_dir={Path(tmp) / 'rerun'}", "seed=1", *over)
            again = stage_manifests(Path(tmp) / "rerun")
    rows, errors, met = [], [], True
    drift: list[float] = []
    total_pred = total_act = 0.0
    for name in STAGES:
        m = ran.get(name)
        if m is None:
            errors.append(f"{name}: no manifest")
            met = False
            continue
        pred = (m.get("predicted") or {}).get("seconds")
        act = m["actual"]["seconds"]
        ok = within(pred, act)
        met &= ok
        total_pred += pred or 0.0
        total_act += act
        err = f"{100 * (pred - act) / act:+.0f} %" if pred is not None and act else "-"
        rerun_s = again.get(name, {}).get("seconds")
        if rerun_s is not None and act >= SHORT_S:
            drift.append(abs(rerun_s - act) / act)
        rows.append(
            [
                name,
                "-" if pred is None else round(pred, 2),
                round(act, 2),
                err,
                (m.get("predicted") or {}).get("completion_tokens", 0),
                m["actual"]["completion_tokens"],
                "yes" if ok else "NO",
                *([] if not rerun else ["-" if rerun_s is None else round(rerun_s, 2)]),
            ]
        )
    total_err = (total_pred - total_act) / total_act if total_act else float("nan")
    mode = "Slurm cluster=ci (one job per stage)" if use_slurm else "local runner (in-process)"
    if not use_slurm and where != "local":
        why = "--quick runs locally" if quick else "Slurm did not answer (`sinfo -h`)"
        mode += f"; not on Slurm: {why}"
    return {
        "name": "planner",
        "title": "GPU-hour planner: predicted vs actual wall time per stage, after plan=probe",
        "header": [
            f"where: {mode}; models: builtin:tiny (hf engine, CPU); config: "
            f"{'quick' if quick else 'full'}",
            f"calibration (plan=probe) {probe_s:.0f} s, then the run {run_s:.0f} s",
        ],
        "tables": [
            md_table(
                [
                    "stage",
                    "predicted s",
                    "actual s",
                    "error",
                    "pred. tokens",
                    "actual tokens",
                    "within",
                    *(["rerun s"] if rerun else []),
                ],
                rows,
            )
        ],
        "notes": [
            "calibration: plan=probe ran every stage on 2 tasks (training: 2 steps) in "
            "<run_dir>/.cpt/probe; the run then predicted each stage from that table",
            "actual s: the stage's wall time in its manifest (inside its Slurm job: the job's "
            "Python start and queueing are not a stage's time)",
            f"within: |error| <= {TOLERANCE:.0%}, or <= {SHORT_ABS_S} s for a stage under "
            f"{SHORT_S:.0f} s",
            f"whole pipeline: predicted {total_pred:.1f} s, actual {total_act:.1f} s "
            f"({100 * total_err:+.0f} %)",
            *(
                [
                    "noise floor: the same stages run again (seed=1, same shapes) took "
                    f"{100 * max(drift):.0f} % apart at most, {100 * sum(drift) / len(drift):.0f} % "
                    f"on average (stages of 2 s or more), machine load now {load_avg()}"
                ]
                if drift
                else [f"machine load now {load_avg()}"]
            ),
            "the plan=probe launch ended with:",
            *[ln.strip() for ln in plan_out.splitlines() if "predicted" in ln or "GPU-hours" in ln],
        ],
        "targets": [
            {
                "what": f"every stage's predicted wall time within +-{TOLERANCE:.0%} of actual",
                "value": f"whole pipeline {100 * total_err:+.0f} %",
                "met": met,
            }
        ],
        "figures": {"total_error": total_err},
        "errors": errors,
        "ok": not errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the local runner, the small config")
    ap.add_argument("--where", choices=("auto", "slurm", "local"), default="auto")
    ap.add_argument(
        "--rerun",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the same work again to show the noise floor (default: on unless --quick)",
    )
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    rerun = not ns.quick if ns.rerun is None else ns.rerun
    sys.exit(finish(main(ns.quick, ns.where, rerun), ns.json))
