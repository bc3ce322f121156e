"""tasks: task sources -> the task table with a train/test split by task.
Reads the sources of `tasks` (shipped JSONL, local files, HF datasets); writes tasks/*.parquet
with columns id (= task_id), text, source, genre, split.
Run alone: python jobs/launch.py stage=tasks
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from cpt import store
from cpt.config import CptConfig, resolve_path
from cpt.graph import StageContext, StageSpec
from cpt.tasks import SHIPPED_PATH, TaskSource, split_tasks
from cpt.workload import load_config_tasks


def _source_fingerprint(src: TaskSource) -> str:
    """Content hash of a local source file, so editing it invalidates the stage."""
    path = SHIPPED_PATH if src.kind == "shipped" and not src.path else src.path or src.name
    p = resolve_path(path) if path else None
    return store.file_sha256(p) if p is not None and p.is_file() else ""


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "tasks": cfg.tasks,
        "seed": cfg.seed,
        "files": [_source_fingerprint(s) for s in cfg.tasks.sources],
    }


def run(ctx: StageContext) -> dict[str, Any]:
    tasks = load_config_tasks(ctx.cfg)
    split = split_tasks(tasks, ctx.cfg.tasks.test_fraction, ctx.cfg.seed)
    table = pa.table(
        {
            "id": [t.task_id for t in tasks],
            "text": [t.text for t in tasks],
            "source": [t.source for t in tasks],
            "genre": [t.genre for t in tasks],
            "split": [split[t.task_id] for t in tasks],
        }
    )
    store.write_shard(ctx.out_dir, 0, table, {})
    n_test = sum(v == "test" for v in split.values())
    return {
        "rows": len(tasks),
        "n_shards": 1,
        "train_tasks": len(tasks) - n_test,
        "test_tasks": n_test,
    }


def plan(cfg: CptConfig) -> dict[str, Any]:
    return {"tasks": cfg.tasks.num_tasks or "all"}


SPEC = StageSpec("tasks", (), params, run, plan)
