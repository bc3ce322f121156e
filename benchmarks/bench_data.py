"""bench_data: the data layer at scale: pairs and metrics over synthetic rows, 10k to 1M.

Two operations, each at 10k, 100k and 1M input rows, each size in its own (forked) process
so the peak memory (ru_maxrss) belongs to that size alone:

    pairs     `cpt.stages.pairs.build_pairs` over generate-like rows (tasks x 2 rubrics x
              3 levels x 4 samples; short texts): the preference rows, both directions
    metrics   `cpt.metrics.summarize` (1000 task-bootstrap resamples) + `best_of_n`
              (N = 1, 2, 4) over judged rows (adherence/evaluate-like: task, rubric, level,
              score 0-100, judge_ok, model, sample_idx)

Linear scaling shows as a flat cost per row: the table gives us/row and its ratio to the
smallest size. Peak memory is the process's high-water mark minus what the synthetic inputs
already held (`+MiB`), and in total.

    python -m benchmarks.bench_data            # 10k, 100k, 1M
    python -m benchmarks.bench_data --quick    # 10k, 100k
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from benchmarks import finish, md_table

RUBRICS = ("baroque-reviewer", "concision")  # the default (tiny) rubric set
SAMPLES = 4
PER_TASK = len(RUBRICS) * 3 * SAMPLES  # generate rows per task (3 levels)
LINEAR_SLACK = 2.0  # per-row cost at 1M may be at most this many times the 10k cost


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synth_pairs_inputs(n_rows: int, cfg) -> tuple[list[dict], list[dict], dict]:
    levels = cfg.levels.names
    n_tasks = max(1, n_rows // PER_TASK)
    tasks = [
        {
            "id": f"t-{i:012d}",
            "text": f"Write a short piece about topic number {i}.",
            "split": "test" if i % 5 == 0 else "train",
            "genre": "story",
        }
        for i in range(n_tasks)
    ]
    gens = []
    for t in tasks:
        for r in RUBRICS:
            for lv in levels:
                for s in range(SAMPLES):
                    gens.append(
                        {
                            "id": f"g-{len(gens):014d}",
                            "task_id": t["id"],
                            "rubric": r,
                            "level": lv,
                            "sample_idx": s,
                            "kind": "rubric",
                            "text": f"A {lv} response to {t['id']} under {r}, sample {s}. " * 3,
                            "ok": True,
                        }
                    )
    sysprompts = {(r, lv): [f"Write with {lv} adherence to {r}."] for r in RUBRICS for lv in levels}
    return tasks, gens, sysprompts  # n_rows rounded down to whole tasks


def synth_judged(n_rows: int, levels: list[str]):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    idx = np.arange(n_rows)
    level_idx = (idx // SAMPLES) % 3
    centre = np.array([20.0, 66.0, 96.0])[level_idx]
    score = np.clip(np.round(centre + rng.normal(0, 15, n_rows)), 0, 100)
    ok = rng.random(n_rows) > 0.02  # 2 % judge failures: excluded and counted, never 0
    score[~ok] = np.nan
    return pd.DataFrame(
        {
            "task_id": [f"t-{i}" for i in idx // PER_TASK],
            "rubric": np.asarray(RUBRICS, dtype=object)[(idx // (3 * SAMPLES)) % 2],
            "target_level": np.asarray(levels, dtype=object)[level_idx],
            "score": score,
            "judge_ok": ok,
            "model": np.where((idx // PER_TASK) % 2 == 0, "base", "cpt"),
            "sample_idx": idx % SAMPLES,
        }
    )


def measure(what: str, n_rows: int) -> dict[str, Any]:
    """One measurement, meant to run in a fresh process (see `main`)."""
    from benchmarks import compose

    cfg = compose("run_dir=/tmp/bench_data-unused")
    if what == "pairs":
        from cpt.stages.pairs import build_pairs

        tasks, gens, sysprompts = synth_pairs_inputs(n_rows, cfg)
        base = _maxrss_mib()
        t = time.perf_counter()
        rows, _ = build_pairs(cfg, tasks, gens, sysprompts, None)
        seconds = time.perf_counter() - t
        out, n_rows = len(rows), len(gens)
        expect = len(gens) // 3 * 6  # 3 level pairs x 2 directions per (task, rubric, sample)
        check = out == expect and len({r["id"] for r in rows}) == out
    else:
        from cpt.metrics import best_of_n, summarize

        scale = cfg.levels.scale
        df = synth_judged(n_rows, cfg.levels.names)
        base = _maxrss_mib()
        t = time.perf_counter()
        summary = summarize(df, scale, n_boot=1000, seed=0)
        bon = best_of_n(df, scale, ns=[1, 2, 4])
        seconds = time.perf_counter() - t
        out = len(bon)
        check = summary["n"] + summary["judge_failures"] == n_rows and 0 < summary["accuracy"] < 1
    peak = _maxrss_mib()
    return {
        "what": what,
        "rows": n_rows,
        "seconds": seconds,
        "out_rows": out,
        "peak_mib": peak,
        "delta_mib": peak - base,
        "ok": bool(check),
    }


def _child(conn, what: str, n: int) -> None:
    try:
        conn.send(measure(what, n))
    except BaseException as exc:  # report, do not hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def main(quick: bool = False) -> dict[str, Any]:
    import multiprocessing

    import cpt.metrics
    import cpt.stages.pairs  # noqa: F401  (imported once here; each measurement forks from this)

    sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
    results: list[dict] = []
    errors: list[str] = []
    ctx = multiprocessing.get_context("fork")  # a fresh process per size, without re-importing
    for what in ("pairs", "metrics"):
        for n in sizes:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, what, n))
            proc.start()
            send.close()
            r = recv.recv() if recv.poll(1800) else {"error": "no answer in 1800 s"}
            proc.join(60)
            if "error" in r or proc.exitcode != 0:
                errors.append(f"{what} at {n} rows: exit {proc.exitcode}: {r.get('error')}")
                continue
            if not r["ok"]:
                errors.append(f"{what} at {n} rows: output check failed ({r})")
            results.append(r)
    table = []
    targets = []
    for what in ("pairs", "metrics"):
        rs = [r for r in results if r["what"] == what]
        if not rs:
            continue
        base_us = rs[0]["seconds"] / rs[0]["rows"] * 1e6
        for r in rs:
            us = r["seconds"] / r["rows"] * 1e6
            table.append(
                [
                    what,
                    r["rows"],
                    r["seconds"],
                    us,
                    us / base_us,
                    r["out_rows"],
                    r["delta_mib"],
                    r["peak_mib"],
                    r["delta_mib"] * 1024 / r["rows"],
                ]
            )
        worst = max(r["seconds"] / r["rows"] * 1e6 for r in rs) / base_us
        targets.append(
            {
                "what": f"{what}: per-row cost flat from {rs[0]['rows']:,} to {rs[-1]['rows']:,} rows",
                "value": f"worst {worst:.2f}x the {rs[0]['rows']:,}-row cost "
                f"(allowed {LINEAR_SLACK:.1f}x)",
                "met": worst <= LINEAR_SLACK,
            }
        )
    tables = [
        md_table(
            [
                "op",
                "rows in",
                "seconds",
                "us/row",
                "vs smallest",
                "rows out",
                "+MiB",
                "peak MiB",
                "KiB/row",
            ],
            table,
        )
    ]
    return {
        "name": "data",
        "title": "data layer at scale (pairs, metrics; one process per size)",
        "header": [
            f"sizes={', '.join(f'{n:,}' for n in sizes)}  rubrics={len(RUBRICS)}  levels=3  "
            f"samples={SAMPLES}  bootstrap=1000  best_of_n=[1,2,4]"
        ],
        "tables": tables,
        "notes": [
            "+MiB: peak RSS during the operation minus RSS with the synthetic inputs built; "
            "peak MiB: the process's high-water mark (Python + inputs + outputs)",
            "pairs: rows out = 2 per generation (3 level pairs x 2 directions per 3 generations)",
            "metrics rows out: Best-of-N table rows (n x model)",
        ],
        "targets": targets,
        "figures": {f"{r['what']}_{r['rows']}_s": r["seconds"] for r in results},
        "errors": errors,
        "ok": not errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="stop at 100k rows")
    ap.add_argument("--one", nargs=2, metavar=("OP", "ROWS"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(measure(ns.one[0], int(ns.one[1]))))
        sys.exit(0)
    sys.exit(finish(main(ns.quick), ns.json))
