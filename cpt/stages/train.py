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

from typing import Any

from cpt import store
from cpt.config import CptConfig, resolve_path
from cpt.fitting import select_split
from cpt.graph import TRAIN, StageContext, StageSpec

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


SPEC = StageSpec("train", ("pairs",), params, run, plan, per_student=True, runs=(TRAIN,))
