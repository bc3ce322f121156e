"""The training recipe as TRL / PEFT / transformers objects: `DPOConfig`, `LoraConfig`, the
base model (bitsandbytes 4/8-bit, DeepSpeed ZeRO-3 aware) and saving the adapter. One
mapping, used by `cpt.train` and by the training benchmark; plus the wall-clock checkpoint
callback (`wall_clock_checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cpt.config import ConfigError, DeepSpeedConfig, ModelConfig, TrainConfig, resolve_path
from cpt.store import replace_dir


def dpo_args(
    cfg: TrainConfig,
    output_dir: Path,
    *,
    use_cpu: bool,
    bf16: bool,
    has_eval: bool = False,
    world: int = 1,
    ds_file: Path | None = None,
    trust_remote_code: bool = False,
    save_total_limit: int = 2,
):
    """The recipe as TRL's `DPOConfig` (one mapping: training and the benchmark use it)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of all steps
        optim=cfg.optim,
        beta=cfg.beta,
        max_length=cfg.max_length,  # a backstop only: rows already fit (see fit_example)
        truncation_mode="keep_start",
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        gradient_checkpointing=cfg.gradient_checkpointing,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.save_steps if has_eval else None,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,  # data order and RNG come back exactly on resume
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=False,
        ddp_backend="gloo" if use_cpu and (world > 1 or ds_file is not None) else None,
        deepspeed=str(ds_file) if ds_file else None,
        trust_remote_code=trust_remote_code,
    )


def lora_config(cfg: TrainConfig):
    """The recipe's LoRA adapter as PEFT's `LoraConfig`."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def deepspeed_file(deepspeed: DeepSpeedConfig | None) -> Path | None:
    if deepspeed is None or deepspeed.name == "none":
        return None
    path = resolve_path(deepspeed.config_file) if deepspeed.config_file else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"deepspeed.config_file: {deepspeed.config_file!r} not found for "
            f"deepspeed={deepspeed.name} (e.g. conf/deepspeed/zero2.json)"
        )
    return path


def zero_stage(ds_file: Path | None) -> int:
    if ds_file is None:
        return 0
    return int(json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage", 0))


def load_model(
    student: ModelConfig, cfg: TrainConfig, model_path: str, use_cpu: bool, zero_stage: int
):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = str(getattr(student.dtype, "value", student.dtype))
    kwargs: dict[str, Any] = {
        "revision": student.revision,
        "trust_remote_code": student.trust_remote_code,
        "dtype": "auto" if dtype == "auto" else getattr(torch, dtype),
    }
    if cfg.quantization != "none":
        compute = torch.float32 if use_cpu else torch.bfloat16
        if cfg.quantization == "4bit":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
                # ZeRO-3 shards parameters by dtype; packed 4-bit weights must share the float one
                bnb_4bit_quant_storage=compute if zero_stage == 3 else torch.uint8,
            )
        else:
            quant = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["quantization_config"] = quant
        if zero_stage != 3:  # bitsandbytes places weights at load time; ZeRO-3 shards them itself
            kwargs["device_map"] = {"": "cpu" if use_cpu else int(os.environ.get("LOCAL_RANK", 0))}
    if zero_stage == 3:
        import deepspeed

        # zero.Init (inside from_pretrained) sizes its batch from DeepSpeed's own communicator,
        # which accelerate leaves uninitialised on CPU: world size 1 -> batch-size assertion.
        deepspeed.init_distributed(dist_backend="gloo" if use_cpu else "nccl")
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    return model


def save_adapter(trainer, tokenizer, dest: Path) -> None:
    """Save the adapter via PEFT from the unwrapped model (no DeepSpeed/DDP names); rank 0 writes.

    Under ZeRO-3 the adapter weights are sharded, so every rank joins the gather first.
    """
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with gather:
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    if trainer.is_world_process_zero():
        replace_dir(tmp, dest)


def wall_clock_checkpoints(every_min: float):
    """A `TrainerCallback` that also saves a checkpoint once `every_min` minutes passed since
    the last save (0: never): a run killed without any signal loses at most that much."""
    from transformers import TrainerCallback

    class WallClockCheckpoint(TrainerCallback):
        def __init__(self) -> None:
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if every_min > 0 and time.monotonic() - self.last >= every_min * 60:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return WallClockCheckpoint()
