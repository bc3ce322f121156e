"""bench_runner: what the sharded runner costs on top of calling the engine directly.

The same rows (generate-style work rows, the real HF engine on the tiny model) go through:

    direct        the worker called in a loop, one call per shard (shards cut as the runner
                  cuts them: rows sorted by id, `shard_size` each); nothing written
    inline        `run_sharded(..., backend="inline")`: sharding, Parquet + zstd, sha256
                  receipts, fsync, atomic renames
    ray x1        `run_sharded(..., backend="ray", replicas=1)`
    ray x2        the same with 2 actors

Model load is outside the timed part of direct and inline (the worker is built once, after a
warm-up batch). Ray actors load their own model, so Ray is shown twice: end to end (actor
start and model load included; the first Ray call also starts Ray itself) and in steady
state, from the shard receipts' timestamps after every actor finished its first shard.
Outputs must be identical on every path (seeded sampling), or the benchmark fails.

    python -m benchmarks.bench_runner                  # 512 rows, 16 shards, 6 rounds, Ray x1/x2
    python -m benchmarks.bench_runner --quick          # 64 rows, 2 shards, 4 rounds, no Ray
    python -m benchmarks.bench_runner --quick --ray    # the quick sizes with Ray x1/x2 too

The quick mode leaves Ray out: starting Ray and two rounds of actors loading models costs
about 50 s on 2 cores, most of the CI budget, and at that scale measures startup only.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import finish, md_table

SHARD_SIZE = 32  # generate.shard_size's default: the unit of work and resume
OVERHEAD_TARGET = 0.05  # the runner may add at most 5 % to calling the engine directly
TOPICS = ("a lighthouse", "a late train", "a cat's opinion", "winter soup", "a broken clock")


@dataclass(frozen=True)
class Prebuilt:
    """A factory that hands out an already-built worker (inline backend: no model load timed).
    The runner closes the workers of a run when it ends; this one serves every run, so each
    gets a view of it whose `close` keeps it open."""

    worker: Any

    def __call__(self):
        return _Kept(self.worker)


class _Kept:
    def __init__(self, worker: Any) -> None:
        self._worker = worker

    def __call__(self, rows):
        return self._worker(rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._worker, name)

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass


def factory(max_new_tokens: int):
    from cpt.config import DType, EngineConfig, EngineKind, ModelConfig, SamplingConfig
    from cpt.generation import GenerateFactory

    model = ModelConfig(
        name="tiny",
        path="builtin:tiny",
        dtype=DType.float32,
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0),
    )
    return GenerateFactory(model, EngineConfig(kind=EngineKind.hf, batch_size=8, replicas=1))


def work_rows(n: int) -> list[dict]:
    from cpt import store
    from cpt.rows import work_row

    return [
        work_row(
            store.content_hash(["bench", i]),
            [
                {"role": "system", "content": "You write with vivid, concrete imagery."},
                {"role": "user", "content": f"Write a short poem about {TOPICS[i % 5]} (#{i})."},
            ],
            0,
            task_id=f"t{i % 16}",
            kind="rubric",
        )
        for i in range(n)
    ]


def run_direct(worker, rows: list[dict], pause_s: float = 0.0) -> tuple[float, list[dict]]:
    """The worker called on each shard in turn; `pause_s` sleeps after each (the control)."""
    from cpt.parallel import plan_shards

    shards = plan_shards([r["id"] for r in rows], SHARD_SIZE)
    t = time.perf_counter()
    out = []
    for idx in shards:
        out += worker([rows[j] for j in idx])
        if pause_s:
            time.sleep(pause_s)
    return time.perf_counter() - t, out


def run_runner(fac, rows: list[dict], out: Path, backend: str, replicas: int = 1) -> float:
    from cpt.parallel import run_sharded

    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    stats = run_sharded(
        rows,
        out,
        SHARD_SIZE,
        fac,
        backend=backend,
        replicas=replicas,
        ray_num_cpus=2,
        log_every_s=1e9,
        label=f"bench-{backend}",
    )
    dt = time.perf_counter() - t
    assert stats.rows == len(rows) and stats.shards_skipped == 0, stats
    return dt


def steady_rate(out: Path, n_shards: int) -> float:
    """Rows/s after every replica finished its first shard (receipt mtimes; startup excluded)."""
    from cpt import store

    done = []
    for i in range(n_shards):
        receipt = store.shard_receipt(out, i, verify=False)
        mtime = store.shard_path(out, i).with_suffix(".json").stat().st_mtime
        done.append((mtime, receipt["pid"], receipt["rows"]))
    done.sort()
    first_by_pid: dict[int, float] = {}
    for t, pid, _ in done:
        first_by_pid.setdefault(pid, t)
    t0 = max(first_by_pid.values())
    after = [(t, rows) for t, _, rows in done if t > t0]
    if not after:
        return float("nan")
    return sum(r for _, r in after) / (after[-1][0] - t0)


def worker_seconds(out: Path, n_shards: int) -> float:
    """Seconds the worker itself took inside a run_sharded run (each receipt times its call)."""
    from cpt import store

    return sum(store.shard_receipt(out, i, verify=False)["seconds"] for i in range(n_shards))


def texts(out: Path, n_shards: int) -> dict[str, str]:
    from cpt import store

    return {
        r["id"]: r["text"] for r in store.read_shards(out, n_shards, ["id", "text"]).to_pylist()
    }


@dataclass(frozen=True)
class Echo:
    """A worker that costs nothing: it returns precomputed outputs (the runner's cost alone)."""

    outputs: dict

    def __call__(self):
        return lambda batch: [self.outputs[r["id"]] for r in batch]


def main(quick: bool = False, with_ray: bool | None = None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # a Ray actor with num_cpus=1 gets one thread: compare like with like
    with_ray = (not quick) if with_ray is None else with_ray
    n_rows, reps, max_new = (64, 4, 32) if quick else (512, 6, 48)
    rows = work_rows(n_rows)
    n_shards = -(-n_rows // SHARD_SIZE)
    fac = factory(max_new)
    errors: list[str] = []
    t = time.perf_counter()
    worker = fac()
    load_s = time.perf_counter() - t
    worker(rows[:8])  # warm-up: first-call allocations, tokenizer caches

    paths = ("direct", "direct+pause", "inline")
    times: dict[str, list[float]] = {p: [] for p in paths}
    engine_s: list[float] = []  # inside each inline run: the worker's own time (receipts)
    with tempfile.TemporaryDirectory(prefix="bench_runner-") as tmp:
        tmp = Path(tmp)
        _, out = run_direct(worker, rows)
        reference = {r["id"]: r for r in out}
        want = {i: r["text"] for i, r in reference.items()}
        # the runner's own cost, without the engine: same output rows, a worker that only echoes
        echo_s = [
            run_runner(Echo(reference), rows, tmp / "echo", "inline")
            for _ in range(3 if quick else 10)
        ]
        pause_s = statistics.median(echo_s) / n_shards
        for rep in range(reps):  # rotate and reverse the order: drift hits every path alike
            order = paths[rep % 3 :] + paths[: rep % 3]
            for path in order[::-1] if rep % 2 else order:
                if path == "inline":
                    times[path].append(run_runner(Prebuilt(worker), rows, tmp / "inline", "inline"))
                    engine_s.append(worker_seconds(tmp / "inline", n_shards))
                else:
                    dt, out = run_direct(worker, rows, pause_s if path == "direct+pause" else 0.0)
                    times[path].append(dt)
                    if {r["id"]: r["text"] for r in out} != want:
                        errors.append(f"{path}: the same rows gave other texts (not seeded?)")
        if texts(tmp / "inline", n_shards) != want:
            errors.append("inline runner outputs differ from calling the worker directly")

        ray_e2e: dict[str, float] = {}
        ray_steady: dict[str, float] = {}
        ray_start_s = float("nan")
        if with_ray:
            import ray

            from cpt.parallel import init_ray

            t = time.perf_counter()
            init_ray(num_cpus=2)
            ray_start_s = time.perf_counter() - t
            for name, replicas in (("ray x1", 1), ("ray x2", 2)):
                out = tmp / name.replace(" ", "_")
                ray_e2e[name] = run_runner(fac, rows, out, "ray", replicas)
                ray_steady[name] = steady_rate(out, n_shards)
                if texts(out, n_shards) != want:
                    errors.append(f"{name}: outputs differ from calling the worker directly")
            ray.shutdown()

    def geo_overhead(num: str, den: str) -> tuple[float, float, float]:
        ratios = [x / y for x, y in zip(times[num], times[den])]
        return (
            math.exp(statistics.fmean(map(math.log, ratios))) - 1,
            min(ratios) - 1,
            max(ratios) - 1,
        )

    direct, control, inline = (statistics.median(times[p]) for p in paths)
    # geometric mean of order-balanced pairs: on a busy machine whichever path runs later in a
    # round tends to be slower, and the rotation cancels that
    overhead, lo, hi = geo_overhead("inline", "direct")
    beyond_pause, _, _ = geo_overhead("inline", "direct+pause")
    in_run = statistics.median(t / e - 1 for t, e in zip(times["inline"], engine_s))
    runner_cost = statistics.median(echo_s)
    cost_share = runner_cost / direct
    base_rate = n_rows / direct
    table = [
        ["direct (worker loop)", direct, base_rate, 1.0, "-", "baseline (a)"],
        [
            "direct + pause (control)",
            control,
            n_rows / control,
            direct / control,
            "-",
            f"sleeps {pause_s * 1000:.0f} ms per shard, as long as the runner's own work",
        ],
        [
            "inline run_sharded",
            inline,
            n_rows / inline,
            direct / inline,
            "-",
            f"(b): {overhead * 100:+.1f} % vs (a) [{lo:+.0%} .. {hi:+.0%}], "
            f"{beyond_pause * 100:+.1f} % vs the control",
        ],
        [
            "  of which engine (receipts)",
            statistics.median(engine_s),
            "-",
            "-",
            "-",
            f"the runner adds {in_run * 100:+.1f} % to the engine's time in the same run",
        ],
        [
            "runner alone (echo worker)",
            runner_cost,
            n_rows / runner_cost,
            direct / runner_cost,
            "-",
            f"{pause_s * 1000:.1f} ms/shard = {cost_share * 100:.2f} % of engine time",
        ],
    ]
    if with_ray:
        table.append(["ray start (init_ray)", ray_start_s, "-", "-", "-", "once per process"])
    for name, e2e in ray_e2e.items():
        table.append(
            [
                name,
                e2e,
                n_rows / e2e,
                direct / e2e,
                ray_steady[name],
                "actor start + model load included",
            ]
        )
    tables = [md_table(["path", "seconds", "rows/s", "vs direct", "steady rows/s", "note"], table)]
    targets = [
        {
            "what": "runner overhead, inline run_sharded (b) vs direct loop (a)",
            "value": f"{overhead * 100:+.1f} % (target < {OVERHEAD_TARGET * 100:.0f} %)",
            "met": overhead < OVERHEAD_TARGET,
        },
        {
            "what": "runner cost alone (echo worker) as a share of engine time",
            "value": f"{cost_share * 100:.2f} % (target < {OVERHEAD_TARGET * 100:.0f} %)",
            "met": cost_share < OVERHEAD_TARGET,
        },
    ]
    figures = {
        "overhead_pct": overhead * 100,
        "overhead_vs_control_pct": beyond_pause * 100,
        "overhead_in_run_pct": in_run * 100,
        "runner_cost_pct": cost_share * 100,
        "direct_s": direct,
        "control_s": control,
        "inline_s": inline,
        "ray_start_s": ray_start_s,
    }
    if with_ray:
        speed_e2e = ray_e2e["ray x1"] / ray_e2e["ray x2"]
        speed_steady = ray_steady["ray x2"] / ray_steady["ray x1"]
        tables.append(
            md_table(
                ["ray x2 vs ray x1", "speedup"],
                [
                    ["end to end (actor start + model load included)", speed_e2e],
                    ["steady state (after each actor's first shard)", speed_steady],
                ],
            )
        )
        figures.update(
            speedup_e2e=speed_e2e,
            speedup_steady=speed_steady,
            ray_x1_s=ray_e2e["ray x1"],
            ray_x2_s=ray_e2e["ray x2"],
        )
    header = [
        f"rows={n_rows}  shard_size={SHARD_SIZE} ({n_shards} shards)  engine=hf batch=8  "
        f"model=builtin:tiny fp32  max_new_tokens={max_new}  torch_threads=1  "
        f"model_load={load_s:.1f}s (not timed for direct/inline)"
    ]
    notes = [
        "of which engine: the worker's own seconds, summed from the shard receipts of the same "
        "inline runs; the rest is the runner (plan, resume scan, Arrow, Parquet, sha256, fsync)",
        f"overhead = geometric mean over {reps} rounds of inline/direct - 1, the order rotating "
        "per round (the range of single rounds in brackets: the noise of a shared machine)",
        "control: the direct loop sleeping as long per shard as the runner works. On a busy "
        "machine any pause between engine calls (sleep, fsync) costs the next call its warm "
        "core; the gap between the control and (a) is that, not runner code",
        "runner alone: run_sharded inline with a worker that returns the same output rows "
        "instantly: sharding, Arrow table, Parquet+zstd, sha256, fsync, atomic renames, receipts",
        "steady rows/s: shards finished after every actor's first one, timed by receipt mtimes",
        f"2 actors on {os.cpu_count()} cores shared with other jobs: the speedup is bounded "
        "by the free cores (see the load average in RESULTS.md)",
    ]
    if not with_ray:
        notes.append("Ray x1 / x2: left out in --quick (add --ray, or run the full mode)")
    return {
        "name": "runner",
        "title": "parallel runner overhead (same rows, same shards, real HF engine)",
        "header": header,
        "tables": tables,
        "notes": notes,
        "targets": targets,
        "figures": figures,
        "errors": errors,
        "ok": not errors,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ray", action="store_true", default=None, help="Ray x1/x2 in --quick too")
    ap.add_argument("--no-ray", dest="ray", action="store_false", help="direct vs inline only")
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    sys.exit(finish(main(ns.quick, with_ray=ns.ray), ns.json))
