"""train: LoRA DPO of one student on the train split of pairs/ (TRL + PEFT, optional
bitsandbytes QLoRA and DeepSpeed ZeRO); the reference is the adapter-disabled base.
Reads pairs/; writes train/<student>-<key>/: adapter/ (PEFT, safetensors, + tokenizer),
checkpoints/ (every train.save_steps; a re-launch resumes from the last), metrics.parquet,
train_summary.json. The reference log-probs come from a table shared by the runs of these
pairs (reflogps/<student>-<key>/ beside the stage folders, `cpt.reftable`), built once.
Run alone: python jobs/launch.py stage=train student=<name>
Sweep:     python jobs/launch.py -m stage=train student=a,b   (data stages run once)
"""

from __future__ import annotations

import math
import time
from typing import Any

from cpt import store
from cpt.config import CptConfig, resolve_path
from cpt.fitting import select_split
from cpt.graph import TRAIN, StageContext, StageSpec
from cpt.workload import Phase, config_tasks, teacher_grid, world_size

REF_TABLES = "reflogps"  # the folder of shared reference log-prob tables, beside the stages


def params(cfg: CptConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    ds_file = resolve_path(ds.config_file) if ds.name != "none" else None
    return {
        "student": cfg.student,
        "train": cfg.train,
        "deepspeed": ds.name,
        "deepspeed_file": store.file_sha256(ds_file) if ds_file and ds_file.is_file() else "",
    }


def run(ctx: StageContext) -> dict[str, Any]:
    from cpt.recipe import wall_clock_checkpoints
    from cpt.train import train_dpo

    cfg = ctx.cfg
    started = time.time()
    pairs = store.read_table(ctx.inputs["pairs"])
    train_rows = select_split(pairs, "train")  # held-out tasks never reach training
    eval_rows = select_split(pairs, "test")
    if train_rows.num_rows == 0:
        raise store.StoreError(
            f"{ctx.inputs['pairs']}: no training pairs (check generate/ "
            "outputs and the adherence filter)"
        )
    result = train_dpo(
        cfg.train,
        cfg.student,
        train_rows,
        ctx.out_dir,
        eval_rows=eval_rows if eval_rows.num_rows else None,
        deepspeed=cfg.deepspeed,
        callbacks=[wall_clock_checkpoints(cfg.cluster.checkpoint_every_min)],
        ref_tables=ctx.inputs["pairs"].parent.parent / REF_TABLES,  # <run_dir>/reflogps
    )
    _free_gpu_memory()  # the next stage's engine (another process) needs it
    done = result.steps - (result.resumed_from_step or 0)
    rows = done * cfg.train.per_device_batch_size * cfg.train.grad_accum * world_size()
    per_row = row_tokens(cfg)
    phase = Phase(
        label="student",
        kind=TRAIN,
        model=cfg.student.path,
        engine=TRAIN,
        requests=rows,
        prompt_tokens=0,
        bound_tokens=rows * per_row,
        units=rows * per_row,
        completion_tokens=rows * per_row,  # (sequence tokens as planned; not counted)
        seconds=round(time.time() - started, 3),
        work_seconds=round(rows / result.samples_per_s, 3) if result.samples_per_s else 0.0,
    )
    return {
        "rows": train_rows.num_rows,
        "n_shards": 0,
        "steps": result.steps,
        "final_loss": result.losses[-1] if result.losses else None,
        "first_loss": result.losses[0] if result.losses else None,
        "samples_per_s": result.samples_per_s,
        "resumed_from_step": result.resumed_from_step,
        "adapter_dir": str(result.adapter_dir),
        "ref_table": result.ref_table,  # computed or reused, and from where (path + key)
        "phases": [phase.as_dict()],
    }


def _free_gpu_memory() -> None:
    """Hand the trainer's cached GPU memory back to the device: the trainer holds reference
    cycles, so the model goes only with a collection, and torch's allocator keeps freed blocks
    reserved for this process until emptied."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan(cfg: CptConfig) -> dict[str, Any]:
    return {
        "student": cfg.student.name,
        "recipe": cfg.train.name,
        "deepspeed": cfg.deepspeed.name,
        "ranks": cfg.train.gpus * cfg.train.nodes or 1,
    }


def row_tokens(cfg: CptConfig) -> int:
    """Tokens of one preference row as trained: prompt + chosen and prompt + rejected, each
    within `max_length` (responses at most the teacher's `max_new_tokens`)."""
    t = cfg.train
    prompt = t.max_prompt_length
    return 2 * min(t.max_length, prompt + cfg.teacher.sampling.max_new_tokens)


def train_pairs(cfg: CptConfig) -> int:
    """Preference rows of the train split if every generation pairs: two per two levels of
    one (task, rubric, sample) (an upper bound: filters and truncation drop some)."""
    groups: dict[tuple, int] = {}
    for g in teacher_grid(cfg, [t for t in config_tasks(cfg) if t["split"] == "train"]):
        if g["kind"] == "rubric":
            key = (g["task_id"], g["rubric"], g["sample_idx"])
            groups[key] = groups.get(key, 0) + 1
    return sum(n * (n - 1) for n in groups.values())


def estimate(cfg: CptConfig) -> list[Phase]:
    """Rows processed: `max_steps` x rows per step, or `epochs` x the train pairs."""
    t = cfg.train
    ranks = max(1, t.gpus * t.nodes) if cfg.cluster.name != "local" else 1
    per_step = t.per_device_batch_size * t.grad_accum * ranks
    if t.max_steps > 0:
        rows = t.max_steps * per_step
    else:
        rows = math.ceil(math.ceil(train_pairs(cfg) * t.epochs) / per_step) * per_step
    tokens = rows * row_tokens(cfg)
    return [Phase("student", TRAIN, cfg.student.path, TRAIN, rows, 0, tokens, tokens)]


SPEC = StageSpec(
    "train",
    ("pairs",),
    params,
    run,
    plan,
    per_student=True,
    runs=(TRAIN,),
    estimate=estimate,
)
