"""bench_warm: the pipeline with warm engines across stages vs every stage loading its own.

Runs the real entry point twice in one run, side by side, on fresh run folders:
`python jobs/launch.py run_dir=<tmp>/cold parallel.warm=false` (each stage starts its Ray
actors and loads its model, as before `cpt.warm`) and the same with `parallel.warm=true`
(the default: a stage reuses the engine the previous stage loaded when model and engine
settings are equal; closed before training). Then it splits each launch's wall time:

- stage work: what the stages are for. Engine stages: the shards' engine time (the union
  over the shard receipts of [written - seconds, written]: generating or judging and
  writing the shard); train: the optimizer steps (`seconds_this_launch` of
  train_summary.json); stages without a model (tasks, pairs, report): their whole run.
- outside stage work: the rest of the launch wall time: process start and imports, config
  and plan, Ray start, replica start and model loads (engines, the trainer's), each stage's
  bookkeeping (reading inputs, building prompts, the trainer's data preparation).

    python -m benchmarks.bench_warm           # the default pipeline (SmolLM2-135M, vLLM): ~12 min
    python -m benchmarks.bench_warm --quick   # tiny models, hf engine, data stages: ~1.5 min

Targets (the issue's): the warm pipeline >= 1.3x faster end to end; outside stage work < 5 %
of the warm launch's wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import REPO, finish, md_table

QUICK = [
    *("teacher=tiny", "judge=tiny", "student=tiny", "train=tiny", "engine=hf"),
    *("pairs.keep_truncated=true", "adherence.judge_truncated=true"),
    *("tasks.num_tasks=2", "rubrics.include=[concision]", "adherence.max_attempts=1"),
    "stage=pairs",  # tasks, generate, sysprompts, adherence, pairs: three engine stages
]
SPEEDUP_TARGET = 1.3
OUTSIDE_TARGET = 0.05


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _engine_work(folder: Path) -> float:
    """Seconds the stage's replicas spent on shards (every shard folder under the stage)."""
    import json

    spans = []
    for receipt in folder.rglob("shards/part-*.json"):
        r = json.loads(receipt.read_text())
        end = receipt.stat().st_mtime
        spans.append((end - float(r.get("seconds", 0.0)), end))
    return _union(spans)


def split(run_dir: Path, wall: float) -> dict[str, Any]:
    """Per stage: wall seconds, work seconds, engine load seconds, engines reused; totals."""
    import json

    stages: dict[str, dict[str, Any]] = {}
    for manifest in sorted(run_dir.glob("*/*/manifest.json")) + sorted(
        run_dir.glob("*/manifest.json")
    ):
        m = json.loads(manifest.read_text())
        if "stage" not in m:  # not a stage's: the shared reference table (reflogps/<key>/)
            continue
        folder, name = manifest.parent, m["stage"]
        if name == "train":
            summary = folder / "train_summary.json"
            work = json.loads(summary.read_text())["seconds_this_launch"] if summary.exists() else 0
        elif m.get("engines"):
            work = _engine_work(folder)
        else:
            work = m["seconds"]
        engines = m.get("engines", [])
        stages[name] = {
            "seconds": m["seconds"],
            "work": work,
            "load": m.get("load_seconds", 0.0),
            "loads": sum(e["reused_from"] is None for e in engines),
            "reused": sum(e["reused_from"] is not None for e in engines),
            "started": m["started"],
        }
    work = sum(s["work"] for s in stages.values())
    return {
        "wall": wall,
        "stages": dict(sorted(stages.items(), key=lambda kv: kv[1]["started"])),
        "work": work,
        "outside": wall - work,
        "in_stages": sum(s["seconds"] for s in stages.values()),
        "loads": sum(s["loads"] for s in stages.values()),
        "load_s": sum(s["load"] for s in stages.values()),
    }


def launch(run_dir: Path, overrides: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "jobs/launch.py", f"run_dir={run_dir}", *overrides]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return wall, f"{run_dir.name}: launch exited {proc.returncode}: {tail}"
    return wall, ""


def main(quick: bool = False, extra: list[str] | None = None) -> dict[str, Any]:
    overrides = [*(QUICK if quick else []), *(extra or [])]
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    errors: list[str] = []
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_warm-") as tmp:
        for mode in ("cold", "warm"):  # one after the other: they would share the 2 cores
            run_dir = Path(tmp) / mode
            wall, err = launch(
                run_dir, [*overrides, f"parallel.warm={str(mode == 'warm').lower()}"]
            )
            errors += [err] if err else []
            runs[mode] = split(run_dir, wall)
    cold, warm = runs["cold"], runs["warm"]
    speedup = cold["wall"] / warm["wall"] if warm["wall"] else float("nan")
    share = {m: r["outside"] / r["wall"] if r["wall"] else float("nan") for m, r in runs.items()}
    stage_rows = [
        [
            name,
            cold["stages"].get(name, {}).get("seconds", float("nan")),
            s["seconds"],
            s["work"],
            s["load"],
            s["seconds"] - s["work"] - s["load"],
            f"{cold['stages'].get(name, {}).get('loads', 0)} / {s['loads']}",
            s["reused"],
        ]
        for name, s in warm["stages"].items()
    ]
    totals = [
        [
            mode,
            r["wall"],
            r["work"],
            r["outside"],
            share[mode] * 100,
            r["loads"],
            r["load_s"],
            r["wall"] - r["in_stages"],
        ]
        for mode, r in runs.items()
    ]
    shown = " ".join(overrides) or "(defaults)"
    return {
        "name": "warm",
        "title": "warm engines across stages vs a load per stage (same pipeline, one run)",
        "header": [
            f"command: python jobs/launch.py run_dir=<tmp> {shown} parallel.warm=false|true",
            f"load average (1, 5, 15 min) at start: {load_start}; at end: "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        ],
        "tables": [
            md_table(
                [
                    "launch",
                    "wall s",
                    "stage work s",
                    "outside s",
                    "outside %",
                    "engine loads",
                    "engine load s",
                    "between stages s",
                ],
                totals,
            ),
            md_table(
                [
                    "stage",
                    "cold s",
                    "warm s",
                    "warm work s",
                    "warm load s",
                    "warm rest s",
                    "loads cold / warm",
                    "reused (warm)",
                ],
                stage_rows,
            ),
        ],
        "notes": [
            "stage work: engine stages = union of shard receipt spans (generating/judging + "
            "writing); train = optimizer steps; tasks, pairs, report = whole stage",
            "outside = wall - stage work: start and imports, config and plan, Ray start, "
            "replica start and model loads, stage bookkeeping; between stages = wall - the "
            "sum of stage wall times (start, imports, compose, plan, report summary)",
            "engine load s: the replicas' engine construction, measured inside the actor "
            "(imports of torch/vLLM included, the actor's process start not); warm rest s: "
            "the stage's other time (the first engine stage: Ray start and the actor's "
            "process start; the trainer: model load, data preparation, final eval, save)",
            "cold runs first, then warm: both on fresh run folders; other jobs on the machine "
            "slow both alike only if the load stays steady (see the load average)",
        ],
        "targets": [
            {
                "what": f"pipeline wall time, cold / warm (target >= {SPEEDUP_TARGET}x)",
                "value": f"{speedup:.2f}x",
                "met": speedup >= SPEEDUP_TARGET,
            },
            {
                "what": f"outside stage work, share of the warm launch (target < "
                f"{OUTSIDE_TARGET:.0%})",
                "value": f"{share['warm']:.1%} (cold {share['cold']:.1%})",
                "met": share["warm"] < OUTSIDE_TARGET,
            },
        ],
        "figures": {
            "speedup": speedup,
            "outside_share_warm": share["warm"],
            "outside_share_cold": share["cold"],
            **{f"{m}_{k}": v for m, r in runs.items() for k, v in r.items() if k != "stages"},
        },
        "errors": errors,
        "ok": not errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, data stages only")
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for both launches")
    ns = ap.parse_args()
    sys.exit(finish(main(ns.quick, ns.overrides), ns.json))
