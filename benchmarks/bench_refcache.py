"""bench_refcache: a 3-point `train.beta` sweep with and without the shared reference table.

Without the table every run pays the DPO reference forward (the adapter-disabled base) at every
step and evaluation; with it (`cpt.reftable`, `train.ref_table`) the first run of the sweep
builds the table once and the other two read it. Same rows, model and recipe; each point of the
sweep runs both ways, back to back, alternating which goes first, so drift hits both alike. The
time is each `train_dpo` call end to end (model load, data, reference table, training, held-out
evaluations, adapter save), summed over the sweep. As in the train stage: one epoch, a checkpoint
and an evaluation on the held-out rows (a fifth of the tasks, as `tasks=shipped`) every
`save_steps` (here half-way and at the end). Target: >= 1.3x less total training time, and
identical losses (within 1e-4) at step 1 (and at every later step, reported).

    python -m benchmarks.bench_refcache            # builtin:tiny, 96 rows, answers x3 (longer)
    python -m benchmarks.bench_refcache --quick    # builtin:tiny, 48 rows (about a minute idle)
    python -m benchmarks.bench_refcache --model builtin:smollm2-135m --tasks 12   # the real model

The full mode runs the tiny model with longer sequences: SmolLM2-135M's sweep (6 runs + a
warm-up) took over 30 min on the shared 2-core machine, past the ~10 min a full benchmark gets.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import finish, md_table
from cpt.config import ModelConfig, TrainConfig
from cpt.models.flip import flip_rows
from cpt.train import TrainResult, train_dpo

BETAS = (0.05, 0.1, 0.2)
ORNATE = (
    "Behold the resplendent {t}, gilded and luminous, a shimmering tapestry of wonder, where every "
    "beam of amber light dances upon bejewelled surfaces and the air itself seems to sing of "
    "opulence, rapture and magnificent, glittering splendour beyond any mortal dream.",
)
PLAIN = ("The {t} is fine. It works. It does what a {t} does, and there is not much more to say.",)


def rows(n_tasks: int, prefix: str, repeat: int = 1):
    """Two preference rows per task; `repeat` lengthens both answers (longer sequences)."""
    topics = [f"object number {i}" for i in range(n_tasks)]
    ornate = tuple(" ".join([a] * repeat) for a in ORNATE)
    plain = tuple(" ".join([a] * repeat) for a in PLAIN)
    return flip_rows(topics, prefix, ornate, plain, ask="Describe the {t} in a few sentences.")


def one_run(cfg, student, train, held, out: Path, tables: Path | None):
    """(wall seconds, CPU seconds of this process, result) of one train_dpo call."""
    t, cpu = time.perf_counter(), time.process_time()
    use_cpu = not torch.cuda.is_available()
    result = train_dpo(cfg, student, train, out, eval_rows=held, use_cpu=use_cpu, ref_tables=tables)
    return time.perf_counter() - t, time.process_time() - cpu, result


def main(quick: bool, tasks: int, held_tasks: int, threads: int, model: str, repeat: int) -> dict:
    torch.set_num_threads(threads)
    student = ModelConfig(name=model.split(":")[-1], path=model)
    train, held = rows(tasks, "b", repeat), rows(held_tasks, "h", repeat)
    batch, accum = 2, 2
    base = dict(
        epochs=1.0,  # every training row once, as the paper's recipe
        learning_rate=1e-3 if quick else 2e-4,
        per_device_batch_size=batch,
        grad_accum=accum,
        warmup_ratio=0.0,
        # as the train stage: a checkpoint and a held-out evaluation every save_steps (here
        # twice a run: half-way and at the end, which the final evaluation reuses)
        save_steps=max(1, (2 * tasks) // (batch * accum) // 2),
        lora_r=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        max_length=320 * repeat,
        max_prompt_length=192,
    )
    times: dict[str, list[float]] = {"live": [], "table": []}
    cpu: dict[str, list[float]] = {"live": [], "table": []}
    results: dict[str, list[TrainResult]] = {"live": [], "table": []}
    with tempfile.TemporaryDirectory(prefix="bench_refcache-") as tmp:
        root = Path(tmp)
        # warm-up (imports, kernels, the built-in model's folder): not counted
        warm = TrainConfig(**{**base, "max_steps": 1})
        one_run(warm, student, train, held, root / "warm", None)
        for i, beta in enumerate(BETAS):
            cfg = TrainConfig(**{**base, "beta": beta})
            order = ("live", "table") if i % 2 == 0 else ("table", "live")
            for path in order:
                out = root / f"{path}-{beta}"
                tables = root / "reflogps" if path == "table" else None
                seconds, cpu_s, result = one_run(cfg, student, train, held, out, tables)
                times[path].append(seconds)
                cpu[path].append(cpu_s)
                status = result.ref_table["status"] if result.ref_table else "live reference"
                print(f"beta={beta} {status}: {seconds:.1f} s wall, {cpu_s:.1f} s CPU", flush=True)
                results[path].append(result)
                shutil.rmtree(out, ignore_errors=True)
    live, table = sum(times["live"]), sum(times["table"])
    live_cpu, table_cpu = sum(cpu["live"]), sum(cpu["table"])
    # the target is on CPU seconds: on a shared machine wall time also counts the waits for
    # CPUs other processes hold; with a GPU (work outside this process's CPU time) on wall time
    gpu = torch.cuda.is_available()
    ratio = live / table if gpu else live_cpu / table_cpu
    wall_ratio, cpu_ratio = live / table, live_cpu / table_cpu
    diffs = [
        max(abs(a - b) for a, b in zip(r1.losses, r2.losses, strict=True))
        for r1, r2 in zip(results["live"], results["table"], strict=True)
    ]
    step1 = max(
        abs(r1.losses[0] - r2.losses[0])
        for r1, r2 in zip(results["live"], results["table"], strict=True)
    )
    statuses = [r.ref_table["status"] for r in results["table"]]
    reuse_ok = statuses == ["computed", "reused", "reused"]
    same = step1 <= 1e-4
    table_rows = [
        [f"beta={beta}", round(a, 2), round(b, 2), round(c, 2), round(d, 2), s, f"{e:.1e}"]
        for beta, a, b, c, d, s, e in zip(
            BETAS, times["live"], times["table"], cpu["live"], cpu["table"], statuses, diffs
        )
    ]
    table_rows.append(
        ["sweep total", round(live, 2), round(table, 2), round(live_cpu, 2), round(table_cpu, 2),
         "", f"{max(diffs):.1e}"]
    )  # fmt: skip
    table_rows.append(
        ["live / table", f"{wall_ratio:.2f}x", "", f"{cpu_ratio:.2f}x", "", "", ""]
    )  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    steps = results["live"][0].steps
    return {
        "name": "refcache",
        "title": "Shared reference log-prob table: 3-point train.beta sweep, with vs without",
        "header": [
            f"device={device}  threads={threads}  model={model}  train rows={train.num_rows}  "
            f"held-out rows={held.num_rows}  steps/run={steps} (1 epoch, batch {batch}x{accum})  "
            f"betas={list(BETAS)}  max_length={base['max_length']}  answers x{repeat}"
        ],
        "tables": [
            md_table(
                [
                    "sweep point",
                    "live ref wall s",
                    "table wall s",
                    "live ref CPU s",
                    "table CPU s",
                    "table",
                    "max |loss diff|",
                ],
                table_rows,
            )
        ],
        "notes": [
            "s: one train_dpo call end to end (model load, data, reference table or not, "
            "training with a checkpoint and held-out evaluation half-way and at the end, adapter "
            "save); warm-up run not counted",
            "live ref: TRL's adapter-disabled reference forward at every step and evaluation",
            "table: the first point builds reflogps/<student>-<key>/ (checked against an HF "
            "forward), the others read it",
            f"loss at step 1: max |diff| {step1:.1e} (target <= 1e-4); every step: {max(diffs):.1e}",
            *(
                [
                    "--quick: 12 short steps a run, where what a run pays either way (model load, "
                    "tokenising, checkpoint, adapter save) weighs most; the full mode measures the "
                    "target"
                ]
                if quick
                else []
            ),
        ],
        "targets": [
            {
                "what": f"sweep training time ({'wall' if gpu else 'CPU'} s), live reference / "
                "shared table (target >= 1.3x)",
                "value": f"{ratio:.2f}x",
                "met": ratio >= 1.3,
            },
            {
                "what": "losses at step 1 equal within 1e-4",
                "value": f"{step1:.1e}",
                "met": same,
            },
        ],
        "figures": {
            "ratio": ratio,
            "wall_ratio": wall_ratio,
            "cpu_ratio": cpu_ratio,
            "live_s": live,
            "table_s": table,
            "step1_diff": step1,
        },
        "errors": ([] if same else [f"step-1 losses differ by {step1}"])
        + ([] if reuse_ok else [f"table statuses {statuses}, expected computed, reused, reused"]),
        "ok": same and reuse_ok,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="builtin:tiny, fewer rows")
    ap.add_argument("--tasks", type=int, default=0, help="training tasks (2 rows each)")
    ap.add_argument("--held-tasks", type=int, default=0, help="held-out tasks (2 rows each)")
    ap.add_argument("--model", default="builtin:tiny", help="e.g. builtin:smollm2-135m")
    ap.add_argument("--repeat", type=int, default=0, help="answer length x (default 1 quick, 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest)")
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    tasks = ns.tasks or (24 if ns.quick else 48)
    held = ns.held_tasks or max(1, tasks // 4)  # test_fraction 0.2
    repeat = ns.repeat or (1 if ns.quick else 3)
    sys.exit(finish(main(ns.quick, tasks, held, ns.threads, ns.model, repeat), ns.json))
