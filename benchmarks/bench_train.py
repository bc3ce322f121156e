"""bench_train: `cpt.train.train_dpo` vs a plain TRL DPO script, same rows, model and recipe.

What cpt adds around TRL (fitting rows to the token limits without cutting the system prompt,
run keys, metrics.parquet, the atomic adapter, the summary) must not slow training down: the
target is >= 0.95x the plain script's training throughput (preference rows per second over the
optimizer steps). Both paths save checkpoints on the same schedule; both first run a warm-up
(imports, kernels, tokenizer caches), then the measured runs alternate so drift hits both alike,
and the median is reported. End-to-end seconds (model load to adapter on disk) are shown too.

    python -m benchmarks.bench_train            # 96 rows, 40 steps x 3 repeats (~4 min on CPU)
    python -m benchmarks.bench_train --quick    # 48 rows, 8 steps x 1 repeat (under a minute)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import finish, md_table
from cpt.config import ModelConfig, TrainConfig
from cpt.models.flip import flip_rows
from cpt.models.tiny import tiny_model_dir
from cpt.recipe import dpo_args, lora_config
from cpt.train import train_dpo

# One long answer per style (each row two full sequences: throughput, not learning, is measured)
ORNATE = (
    "Behold the resplendent {t}, gilded and luminous, a shimmering tapestry of wonder, "
    "where every beam of amber light dances upon bejewelled surfaces and the air itself "
    "seems to sing of opulence, rapture and magnificent, glittering splendour.",
)
PLAIN = ("The {t} is fine. It works. It does what a {t} does, and there is not much more to say.",)


def bench_rows(n_tasks: int) -> pa.Table:
    topics = [f"object number {i}" for i in range(n_tasks)]
    return flip_rows(topics, "b", ORNATE, PLAIN, ask="Describe the {t}.")


@dataclass
class Run:
    samples_per_s: float
    end_to_end_s: float
    losses: list[float]


def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Rows/s over the optimizer steps: identical for both paths."""

        def __init__(self) -> None:
            self.t0 = self.t1 = 0.0
            self.s0 = self.s1 = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.s0 = time.perf_counter(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            self.t1, self.s1 = time.perf_counter(), state.global_step

        def rate(self, rows_per_step: int) -> float:
            return (self.s1 - self.s0) * rows_per_step / (self.t1 - self.t0)

    return Timer()


def run_cpt(cfg: TrainConfig, rows: pa.Table, out: Path) -> Run:
    timer = _timer()
    t = time.perf_counter()
    result = train_dpo(
        cfg,
        ModelConfig(name="tiny", path="builtin:tiny"),
        rows,
        out,
        use_cpu=not torch.cuda.is_available(),
        callbacks=[timer],
    )
    return Run(
        timer.rate(cfg.per_device_batch_size * cfg.grad_accum),
        time.perf_counter() - t,
        result.losses,
    )


def run_plain_trl(cfg: TrainConfig, rows: pa.Table, out: Path) -> Run:
    """What a user would write with TRL alone: same recipe, same rows, no cpt code."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    timer = _timer()
    t = time.perf_counter()
    model_dir = tiny_model_dir("tiny")
    use_cpu = not torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # the same recipe mapping as cpt (one DPOConfig / LoraConfig), minus cpt's own work
    args = dpo_args(cfg, out / "checkpoints", use_cpu=use_cpu, bf16=not use_cpu)
    lora = lora_config(cfg)
    data = Dataset.from_list(rows.select(["prompt", "chosen", "rejected"]).to_pylist())
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer],
    )
    trainer.train()
    trainer.save_model(str(out / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h]
    return Run(
        timer.rate(cfg.per_device_batch_size * cfg.grad_accum), time.perf_counter() - t, losses
    )


def main(quick: bool, steps: int = 40, repeats: int = 3, tasks: int = 48, threads: int = 1):
    """Run both paths and return the result dict `benchmarks.finish` prints and stores."""
    if quick:
        steps, repeats, tasks = 8, 1, 24
    torch.set_num_threads(threads)
    rows = bench_rows(tasks)
    cfg = TrainConfig(
        max_steps=steps,
        learning_rate=1e-3,
        per_device_batch_size=2,
        grad_accum=2,
        save_steps=max(1, steps // 2),
        warmup_ratio=0.1,
    )
    paths = {"trl_plain": run_plain_trl, "cpt.train_dpo": run_cpt}
    results: dict[str, list[Run]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        for name, fn in paths.items():  # warm-up: imports, allocator, tokenizer caches
            fn(TrainConfig(**{**cfg.__dict__, "max_steps": 2}), rows, Path(tmp) / f"warm-{name}")
        for rep in range(repeats):
            order = list(paths.items()) if rep % 2 == 0 else list(paths.items())[::-1]
            for name, fn in order:
                out = Path(tmp) / f"{name}-{rep}"
                results[name].append(fn(cfg, rows, out))
                shutil.rmtree(out, ignore_errors=True)

    plain, ours = results["trl_plain"][0].losses, results["cpt.train_dpo"][0].losses
    same = len(plain) == len(ours) and all(abs(a - b) <= 1e-4 for a, b in zip(plain, ours))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    base = statistics.median(r.samples_per_s for r in results["trl_plain"])
    table, ratio = [], 1.0
    for name, runs in results.items():
        rate = statistics.median(r.samples_per_s for r in runs)
        wall = statistics.median(r.end_to_end_s for r in runs)
        ratio = rate / base
        table.append([name, round(rate, 2), round(wall, 2), f"{ratio:.2f}x"])
    return {
        "name": "train",
        "title": "DPO training: cpt.train.train_dpo vs a plain TRL script (same rows, model, recipe)",
        "header": [
            f"device={device}  threads={threads}  rows={rows.num_rows}  steps={steps}  "
            f"batch={cfg.per_device_batch_size}x{cfg.grad_accum}  repeats={repeats} (median)  "
            f"model=builtin:tiny  same_losses={same}"
        ],
        "tables": [md_table(["path", "rows/s", "end-to-end s", "vs trl_plain"], table)],
        "notes": [
            "rows/s: preference rows per second over the optimizer steps (same callback for both)",
            "end-to-end s: model load + data preparation + training + checkpoints + adapter save",
            "both save checkpoints every steps/2; warm-up runs (2 steps each) are not counted",
        ],
        "targets": [
            {
                "what": "cpt.train_dpo rows/s vs plain TRL (target >= 0.95x)",
                "value": f"{ratio:.2f}x",
                "met": ratio >= 0.95,
            }
        ],
        "figures": {"ratio_vs_trl": ratio, "rows_per_s_trl": base},
        "errors": [] if same else [f"losses differ: plain TRL {plain} vs cpt {ours}"],
        "ok": same,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 steps x 1 repeat, 48 rows")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=48, help="tasks (2 rows each)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest)")
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    result = main(ns.quick, ns.steps, ns.repeats, ns.tasks, ns.threads)
    sys.exit(finish(result, ns.json))
