"""What training prints: a progress bar for a person at a terminal; one short line per
logging step (loss, reward accuracy, margin) in a log file (Slurm, pipes). transformers'
own output, a raw dict of ~15 numbers per step, is removed; every number still goes to
train/<student>/metrics.parquet (`metrics_table`) and the report's training section.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import pyarrow as pa

log = logging.getLogger("cpt.train")

METRIC_COLUMNS = (
    "step",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "learning_rate",
    "epoch",
)


def interactive() -> bool:
    """A person watching a terminal (progress bar) rather than a log file (Slurm, pipes)."""
    return sys.stderr.isatty() and not os.environ.get("SLURM_JOB_ID")


def console(trainer) -> None:
    """Replace transformers' console output (a raw dict per logging step): a progress bar
    on a terminal; otherwise one short line per logging step (loss, reward accuracy and
    margin), as a log file wants it. Every number still goes to metrics.parquet."""
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    class _Bar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass  # the bar only: the numbers are in metrics.parquet and the report

    class _Lines(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            prefix = "eval_" if "eval_loss" in logs else ""
            if f"{prefix}loss" not in logs:
                return
            log.info(
                "train %sstep %d/%d: loss %.4f, reward accuracy %.2f, margin %.4f%s",
                "eval at " if prefix else "",
                state.global_step,
                state.max_steps,
                logs[f"{prefix}loss"],
                logs.get(f"{prefix}rewards/accuracies", float("nan")),
                logs.get(f"{prefix}rewards/margins", float("nan")),
                "" if prefix else f", lr {logs.get('learning_rate', float('nan')):.2e}",
            )

    trainer.add_callback(_Bar() if interactive() else _Lines())


def quiet_datasets() -> None:
    """No "Tokenizing train dataset" bars in a log file (they stay on a terminal)."""
    if not interactive():
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


def metrics_table(log_history: list[dict[str, Any]]) -> pa.Table:
    """metrics.parquet: one row per logged step, METRIC_COLUMNS first, then any other number."""
    rows = [h for h in log_history if "loss" in h and "step" in h]
    extra = sorted(
        {
            k
            for h in rows
            for k, v in h.items()
            if k not in METRIC_COLUMNS and isinstance(v, int | float)
        }
    )
    fields = [pa.field("step", pa.int64())]
    fields += [pa.field(c, pa.float64()) for c in (*METRIC_COLUMNS[1:], *extra)]
    data = {f.name: [h.get(f.name) for h in rows] for f in fields}
    return pa.table(data, schema=pa.schema(fields))
