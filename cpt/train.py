"""train: preference rows + one base model -> a LoRA adapter (TRL DPO + PEFT), resumable.

Reads conversational preference rows (TRL format: `id`, `prompt` = [system, user], `chosen` and
`rejected` = [assistant]; other columns are ignored) and writes under `out_dir`:

    adapter/                    PEFT adapter (safetensors) + tokenizer; rank 0, temp folder + rename
    checkpoints/checkpoint-N/   HF Trainer checkpoints every `save_steps` optimizer steps (last 2 kept)
    metrics.parquet             one row per logged step: loss, rewards/*, learning_rate, epoch, ...
    train_summary.json          config, data statistics, steps, throughput, where it resumed from,
                                the reference table used (`ref_table`: computed or reused, where)
    run_key.json                what the checkpoints belong to (config + data hash), checked on resume

The reference model is the base with the adapter disabled (no second copy); with `ref_tables`
its log-probs come from a table shared by runs (`cpt.reftable`). A re-launch resumes
from the newest complete checkpoint and ends with the same adapter as a run never stopped; a
finished run (summary with the same run key) is returned without training again. The system
prompt is never truncated (`cpt.fitting`). The recipe is `cpt.config.TrainConfig`.

Run alone (one process; or one per GPU under torchrun / srun / submitit tasks); the options
are the fields of `TrainCLI` and `TrainConfig` (dashes or underscores). Only rows of `--split`
(default `train`) are trained on, `--eval-split` (`test`) of `--eval-rows` evaluated:

    python -m cpt.train --rows pairs/shards --student-path builtin:tiny --out outputs/train/tiny --max-steps 20
    torchrun --nproc-per-node 4 -m cpt.train --rows ... --deepspeed conf/deepspeed/zero2.json
    srun --ntasks-per-node 4 python -m cpt.train ...     # RANK etc. derived from SLURM_* variables
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from cpt.cluster import distributed_env_from_slurm, ensure_single_process_env
from cpt.config import (
    ConfigError,
    DeepSpeedConfig,
    DType,
    ModelConfig,
    TrainConfig,
)
from cpt.fitting import prepare_rows, read_rows, rows_fingerprint
from cpt.recipe import (
    deepspeed_file,
    dpo_args,
    load_model,
    lora_config,
    save_adapter,
    zero_stage,
)
from cpt.reftable import use_table
from cpt.store import (
    atomic_write_json,
    atomic_write_parquet,
    content_hash,
    package_versions,
    read_json,
)
from cpt.train_log import console, metrics_table, quiet_datasets

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback

log = logging.getLogger("cpt.train")

CHECKPOINT_PREFIX = "checkpoint-"
SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk; the newest is the one a re-launch resumes from


@dataclass
class TrainResult:
    """What `train_dpo` produced (paths exist on every rank once it returns).

    losses: the logged training loss per logged step (the whole run, resumed or not).
    steps: optimizer steps done in total. samples_per_s: preference rows per second over the
    optimizer steps this launch ran (all processes). resumed_from_step: the checkpoint step this
    launch started from, None for a fresh start. ref_table: `cpt.reftable.TableUse` as a dict.
    """

    adapter_dir: Path
    metrics_path: Path
    losses: list[float]
    steps: int
    samples_per_s: float
    resumed_from_step: int | None
    ref_table: dict[str, Any] | None = None


# ------------------------------------------------------------------ checkpoints


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """Newest complete `checkpoint-N` (one with trainer_state.json, which HF writes last)."""
    if not checkpoints_dir.is_dir():
        return None
    done = [
        p
        for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def _drop_incomplete_checkpoints(checkpoints_dir: Path) -> None:
    # A process killed while saving leaves a folder without trainer_state.json; HF would count it
    # in its rotation and a later save of the same step would mix old and new files.
    for p in checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        if p.is_dir() and not (p / "trainer_state.json").is_file():
            log.warning("train: removing incomplete checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ training


class _StepTimer:
    """Wall time and optimizer steps of this launch (throughput without resume distortion)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.step0 = 0
        self.t1: float | None = None
        self.step1 = 0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.t0, timer.step0 = time.perf_counter(), state.global_step

            def on_step_end(self, args, state, control, **kwargs):
                timer.t1, timer.step1 = time.perf_counter(), state.global_step

        return _Cb()

    def steps(self) -> int:
        return max(0, self.step1 - self.step0)

    def seconds(self) -> float:
        return (self.t1 - self.t0) if self.t0 is not None and self.t1 is not None else 0.0


def _run_key(
    cfg: TrainConfig, student: ModelConfig, fingerprint: str, eval_fp: str | None, ds_name: str
) -> str:
    model = {
        "path": student.path,
        "revision": student.revision,
        "dtype": getattr(student.dtype, "value", student.dtype),
        "system_role": student.system_role,
    }
    return content_hash(
        {"train": cfg, "model": model, "rows": fingerprint, "eval": eval_fp, "deepspeed": ds_name},
        16,
    )


def _result_from_summary(out_dir: Path, summary: dict[str, Any]) -> TrainResult:
    return TrainResult(
        adapter_dir=out_dir / "adapter",
        metrics_path=out_dir / "metrics.parquet",
        losses=list(summary["losses"]),
        steps=int(summary["steps"]),
        samples_per_s=float(summary["samples_per_s"]),
        resumed_from_step=summary.get("resumed_from_step"),
        ref_table=summary.get("ref_table"),
    )


@dataclass
class _Run:
    """One training launch, set up: what `_train` and `_save` need."""

    cfg: TrainConfig
    student: ModelConfig
    out_dir: Path
    key: str
    tokenizer: PreTrainedTokenizerBase
    model_path: str
    train_data: list[dict[str, Any]]
    train_stats: dict[str, Any]
    eval_data: list[dict[str, Any]] | None
    eval_stats: dict[str, Any] | None
    ds_name: str
    ds_file: Path | None
    use_cpu: bool
    world: int
    resume: Path | None
    quantized: str | None = None  # what the base model was loaded as ("4bit", "8bit")
    ref_tables: Path | None = None  # where shared reference tables live (None: none used)
    ref_table: dict[str, Any] | None = None  # the table this launch used

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def _setup(
    cfg: TrainConfig,
    student: ModelConfig,
    train_rows: pa.Table,
    out_dir: Path,
    eval_rows: pa.Table | None,
    deepspeed: DeepSpeedConfig | None,
    use_cpu: bool | None,
) -> _Run | TrainResult:
    """Tokenizer, fitted rows, run key and the checkpoint to resume from; a TrainResult if
    this run finished already."""
    import torch
    from transformers import AutoTokenizer

    from cpt.models import resolve_model_path

    use_cpu = (not torch.cuda.is_available()) if use_cpu is None else use_cpu
    ds_file = deepspeed_file(deepspeed)
    if ds_file is not None:
        ensure_single_process_env()
    model_path = resolve_model_path(student.path, student.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=student.revision, trust_remote_code=student.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_data, train_stats = prepare_rows(train_rows, tokenizer, cfg, student.system_role)
    eval_data, eval_stats = (None, None)
    if eval_rows is not None:
        eval_data, eval_stats = prepare_rows(eval_rows, tokenizer, cfg, student.system_role)
    ds_name = deepspeed.name if ds_file else "none"
    key = _run_key(
        cfg,
        student,
        rows_fingerprint(train_rows),
        rows_fingerprint(eval_rows) if eval_rows is not None else None,
        ds_name,
    )
    summary_path, key_path = out_dir / "train_summary.json", out_dir / "run_key.json"
    if summary_path.is_file() and (out_dir / "adapter").is_dir():
        summary = read_json(summary_path)
        if summary.get("run_key") == key:
            log.info("train: %s already finished (run key %s); nothing to do", out_dir, key)
            return _result_from_summary(out_dir, summary)
    if key_path.is_file() and read_json(key_path).get("run_key") != key:
        raise ConfigError(
            f"train: {out_dir} holds checkpoints of a different run (config, model or rows "
            f"changed: run key {read_json(key_path).get('run_key')} != {key}); use a new out_dir "
            "or delete the old one"
        )
    ckpt_dir = out_dir / "checkpoints"
    if int(os.environ.get("RANK", "0")) == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(key_path, {"run_key": key})
        _drop_incomplete_checkpoints(ckpt_dir)
    return _Run(
        cfg=cfg,
        student=student,
        out_dir=out_dir,
        key=key,
        tokenizer=tokenizer,
        model_path=model_path,
        train_data=train_data,
        train_stats=train_stats,
        eval_data=eval_data,
        eval_stats=eval_stats,
        ds_name=ds_name,
        ds_file=ds_file,
        use_cpu=use_cpu,
        world=int(os.environ.get("WORLD_SIZE", "1")),
        resume=latest_checkpoint(ckpt_dir),
    )


def _trainer(run: _Run, timer: _StepTimer, callbacks: Sequence[TrainerCallback] | None):
    """The DPOTrainer of a set-up run (DPOConfig first: under ZeRO-3 from_pretrained then
    builds the model already sharded)."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    has_eval = run.eval_data is not None
    args = dpo_args(
        run.cfg,
        run.ckpt_dir,
        use_cpu=run.use_cpu,
        bf16=not run.use_cpu and torch.cuda.is_bf16_supported(),
        has_eval=has_eval,
        world=run.world,
        ds_file=run.ds_file,
        trust_remote_code=run.student.trust_remote_code,
        save_total_limit=SAVE_TOTAL_LIMIT,
    )
    args.precompute_ref_log_probs &= run.ref_tables is None  # a table supersedes TRL's own
    model = load_model(run.student, run.cfg, run.model_path, run.use_cpu, zero_stage(run.ds_file))
    run.quantized = (
        "4bit"
        if getattr(model, "is_loaded_in_4bit", False)
        else "8bit"
        if getattr(model, "is_loaded_in_8bit", False)
        else None
    )
    quiet_datasets()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(run.train_data),
        eval_dataset=Dataset.from_list(run.eval_data) if has_eval else None,
        processing_class=run.tokenizer,
        peft_config=lora_config(run.cfg),
        callbacks=[timer.callback(), *(callbacks or [])],
    )
    if run.ref_tables is not None:
        use = use_table(
            trainer,
            run.ref_tables,
            run.student,
            run.cfg.quantization,
            run.model_path,
            always=run.cfg.ref_table == "true",
        )
        run.ref_table = dataclasses.asdict(use)
    console(trainer)
    return trainer


def _save(run: _Run, trainer, timer: _StepTimer, eval_metrics: dict | None) -> TrainResult:
    """Adapter (rank 0, atomic), metrics.parquet and train_summary.json."""
    import torch

    cfg, student, out_dir = run.cfg, run.student, run.out_dir
    rows_per_step = cfg.per_device_batch_size * cfg.grad_accum * run.world
    samples_per_s = timer.steps() * rows_per_step / timer.seconds() if timer.seconds() else 0.0
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    resumed_from = int(run.resume.name.removeprefix(CHECKPOINT_PREFIX)) if run.resume else None
    save_adapter(trainer, run.tokenizer, out_dir / "adapter")
    if trainer.is_world_process_zero():
        atomic_write_parquet(out_dir / "metrics.parquet", metrics_table(trainer.state.log_history))
        summary = {
            "run_key": run.key,
            "train": dataclasses.asdict(cfg),
            "student": {
                "name": student.name,
                "path": student.path,
                "revision": student.revision,
                "system_role": student.system_role,
            },
            "deepspeed": run.ds_name,
            "world_size": run.world,
            "device": "cpu" if run.use_cpu else torch.cuda.get_device_name(),
            "base_quantized": run.quantized,
            "data": run.train_stats,
            "eval_data": run.eval_stats,
            "eval": eval_metrics,
            "steps": trainer.state.global_step,
            "losses": losses,
            "final_loss": losses[-1] if losses else None,
            "samples_per_s": samples_per_s,
            "steps_this_launch": timer.steps(),
            "seconds_this_launch": timer.seconds(),
            "resumed_from_step": resumed_from,
            "ref_table": run.ref_table,
            "versions": package_versions(),
        }
        atomic_write_json(out_dir / "train_summary.json", summary)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=out_dir / "adapter",
        metrics_path=out_dir / "metrics.parquet",
        losses=losses,
        steps=trainer.state.global_step,
        samples_per_s=samples_per_s,
        resumed_from_step=resumed_from,
        ref_table=run.ref_table,
    )


def train_dpo(
    cfg: TrainConfig,
    student: ModelConfig,
    train_rows: pa.Table,
    out_dir: str | Path,
    eval_rows: pa.Table | None = None,
    deepspeed: DeepSpeedConfig | None = None,
    use_cpu: bool | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
    ref_tables: str | Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `student` with DPO on `train_rows`; resumable; see the module doc.

    Args:
        cfg: the training recipe.
        student: the base model (path or `builtin:tiny`, revision, dtype, `system_role`,
            `trust_remote_code` - the only place remote code is allowed from).
        train_rows / eval_rows: preference rows (TRL conversational columns; others ignored).
        out_dir: the run's train folder; a re-launch with the same folder resumes.
        deepspeed: a ZeRO config (`name != "none"`); needs torch distributed env vars (set to a
            single process if absent) and the gloo backend on CPU.
        use_cpu: force CPU (None = CPU when CUDA is absent). CPU runs in float32 (no bf16).
        callbacks: extra `transformers.TrainerCallback`s (tests use one to simulate a kill).
        ref_tables: the folder of shared reference log-prob tables (`cpt.reftable`; used as
            `cfg.ref_table` says); None: the reference forward runs in this run (TRL).

    Raises:
        ValueError: rows without the required columns, or none fitting `max_prompt_length`.
        ConfigError: a missing DeepSpeed file, or `out_dir` holding checkpoints of another run.
    """
    run = _setup(cfg, student, train_rows, Path(out_dir), eval_rows, deepspeed, use_cpu)
    if isinstance(run, TrainResult):  # finished already
        return run
    run.ref_tables = Path(ref_tables) if ref_tables and cfg.ref_table != "false" else None
    timer = _StepTimer()
    trainer = _trainer(run, timer, callbacks)
    if run.resume:
        log.info("train: resuming from %s", run.resume)
    trainer.train(resume_from_checkpoint=str(run.resume) if run.resume else None)
    eval_metrics = _final_eval(trainer) if run.eval_data is not None else None
    return _save(run, trainer, timer, eval_metrics)


def _final_eval(trainer: Any) -> dict[str, float]:
    """Held-out metrics at the last step: the Trainer's own there, if it ran one (not twice)."""
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1].get("step") == trainer.state.global_step:
        return {k: v for k, v in last[-1].items() if k != "step"}
    return trainer.evaluate()


# ------------------------------------------------------------------ command line


@dataclass
class TrainCLI:
    """What `python -m cpt.train` needs besides the recipe (`TrainConfig`'s fields)."""

    rows: list[str] = field(metadata={"help": "preference rows: Parquet file(s) or folder(s)"})
    student_path: str = field(
        metadata={"help": "HF id, local folder, .gguf file, or builtin:smollm2-135m / builtin:tiny"}
    )
    out: str = field(metadata={"help": "train folder (re-use it to resume)"})
    split: str = field(default="train", metadata={"help": "the split of --rows to train on"})
    eval_rows: list[str] = field(default_factory=list, metadata={"help": "held-out rows"})
    eval_split: str = field(default="test", metadata={"help": "the split of --eval-rows"})
    student_name: str = field(default="", metadata={"help": "label (default: last path part)"})
    revision: str = "main"
    dtype: str = field(default="auto", metadata={"choices": [d.value for d in DType]})
    system_role: bool = field(
        default=True,
        metadata={"help": "--no-system-role folds the system prompt into the first user turn"},
    )
    trust_remote_code: bool = False
    deepspeed: str = field(
        default="", metadata={"help": "DeepSpeed JSON, e.g. conf/deepspeed/zero2.json"}
    )
    cpu: bool = field(
        default=False, metadata={"help": "force CPU (default: CPU when CUDA is absent)"}
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cpt.train`: the options are generated from `TrainCLI` and `TrainConfig`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((TrainCLI, TrainConfig), prog="python -m cpt.train")
    # a bad value stops here (TrainConfig's checks), before any model or process group
    cli, cfg = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    distributed_env_from_slurm()
    name = cli.student_name or cli.student_path.rstrip("/").split("/")[-1].split(":")[-1]
    student = ModelConfig(
        name=name,
        path=cli.student_path,
        revision=cli.revision,
        dtype=DType(cli.dtype),
        system_role=cli.system_role,
        trust_remote_code=cli.trust_remote_code,
    )
    ds = (
        DeepSpeedConfig(name=Path(cli.deepspeed).stem, config_file=cli.deepspeed)
        if cli.deepspeed
        else None
    )
    result = train_dpo(
        cfg,
        student,
        read_rows(cli.rows, cli.split),
        Path(cli.out),
        eval_rows=read_rows(cli.eval_rows, cli.eval_split) if cli.eval_rows else None,
        deepspeed=ds,
        use_cpu=True if cli.cpu else None,
        ref_tables=Path(cli.out).absolute().parent / "reflogps",  # shared by runs beside it
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "adapter_dir": str(result.adapter_dir),
                    "steps": result.steps,
                    "final_loss": result.losses[-1] if result.losses else None,
                    "samples_per_s": round(result.samples_per_s, 3),
                    "resumed_from_step": result.resumed_from_step,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
