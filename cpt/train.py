"""train: preference rows + one base model -> a LoRA adapter (TRL DPO + PEFT), resumable.

Reads conversational preference rows (TRL format: `id`, `prompt` = [system, user], `chosen` and
`rejected` = [assistant]; other columns are ignored) and writes under `out_dir`:

    adapter/                    PEFT adapter (safetensors) + tokenizer; rank 0, temp folder + rename
    checkpoints/checkpoint-N/   HF Trainer checkpoints every `save_steps` optimizer steps (last 2 kept)
    metrics.parquet             one row per logged step: loss, rewards/*, learning_rate, epoch, ...
    train_summary.json          config, data statistics, steps, throughput, where it resumed from
    run_key.json                what the checkpoints belong to (config + data hash), checked on resume

The reference model is the base with the adapter disabled (no second copy). A re-launch resumes
from the newest complete checkpoint and ends with the same adapter as a run never stopped; a
finished run (summary with the same run key) is returned without training again.

The conditioning system prompt is never truncated: `fit_example` shortens the user task until the
rendered prompt fits `max_prompt_length`, then the responses until prompt + response fit
`max_length`. (TRL 1.16 has no `max_prompt_length`; its collator cuts prompt + completion to
`max_length` with `truncation_mode="keep_start"` and drops rows whose prompt alone fills it.)

Run alone (one process; or one per GPU under torchrun / srun / submitit tasks):

    python -m cpt.train --rows pairs/shards --student-path builtin:tiny --out outputs/train/tiny --max-steps 20
    torchrun --nproc-per-node 4 -m cpt.train --rows ... --deepspeed conf/deepspeed/zero2.json
    srun --ntasks-per-node 4 python -m cpt.train ...     # RANK etc. derived from SLURM_* variables
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from cpt.engines.base import fold_system
from cpt.store import (
    atomic_write_bytes,
    atomic_write_json,
    content_hash,
    package_versions,
    read_json,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback

    from cpt.config import DeepSpeedConfig, ModelConfig

# cpt.config is imported inside functions: it may register TrainConfig (import cpt.train) itself.

log = logging.getLogger("cpt.train")

QUANTIZATIONS = ("none", "4bit", "8bit")
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
REQUIRED_COLUMNS = ("id", "prompt", "chosen", "rejected")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_PREFIX = "checkpoint-"
SAVE_TOTAL_LIMIT = 2  # checkpoints kept on disk; the newest is the one a re-launch resumes from


@dataclass
class TrainConfig:
    """DPO + LoRA training of one student. Defaults follow the paper's reference recipe
    (METHOD.md, "Training"): 4-bit base, LoRA r=16 α=16 dropout 0 on all attention and MLP
    projections, β=0.1, 1 epoch, max length 2048, max prompt 256, batch 1 × grad-accum 4,
    warmup 10 %, 8-bit AdamW. Where a default departs from it, the field says why.

    Parameters:
        > LoRA

        lora_r (`int`, defaults to `16`): adapter rank (reference recipe). Higher fits more and costs
            memory linearly in r.
        lora_alpha (`float`, defaults to `16`): LoRA scale numerator; the update is scaled by
            α / r (reference recipe: α = r, scale 1).
        lora_dropout (`float`, defaults to `0.0`): dropout on the adapter input, in [0, 1)
            (reference recipe).
        target_modules (`list[str]`, defaults to the 7 Llama projections): modules that get an
            adapter: q,k,v,o (attention) and gate,up,down (MLP), as in the reference recipe.
            `lm_head` is rejected (TRL computes log-probs from `lm_head.weight` directly).

        > DPO

        beta (`float`, defaults to `0.1`): DPO β, the strength of the pull towards the reference
            (paper; also TRL's default). Higher β = smaller deviation from the base.
        precompute_ref_log_probs (`bool`, defaults to `False`): compute the reference log-probs
            once before training (TRL caches them keyed by data + model hash) instead of one
            adapter-disabled forward per step; faster for several epochs.

        > Optimisation

        epochs (`float`, defaults to `1.0`): passes over the training rows (paper: one epoch).
            Ignored when `max_steps > 0`.
        max_steps (`int`, defaults to `-1`): optimizer steps to run; -1 = derive from `epochs`.
            The LR schedule is laid out over this number, so changing it changes every step.
        learning_rate (`float`, defaults to `5e-5`): peak LR of the linear schedule (reference
            recipe; TRL's `DPOConfig` default is 1e-6, transformers' 5e-5, so we set it here).
        per_device_batch_size (`int`, defaults to `1`): preference rows per forward pass and
            process (reference recipe). Each row is two sequences (chosen and rejected).
        grad_accum (`int`, defaults to `4`): micro-batches per optimizer step (reference recipe);
            rows per step = per_device_batch_size × grad_accum × processes.
        warmup_ratio (`float`, defaults to `0.1`): share of the steps with a linear LR warm-up,
            in [0, 1) (reference recipe: 10 %).
        optim (`str`, defaults to `"adamw_torch"`): a transformers optimizer name. The paper's
            recipe used 8-bit AdamW (`"paged_adamw_8bit"`, bitsandbytes, CUDA); the default is
            the plain torch AdamW so CPU runs and tests work.
        gradient_checkpointing (`bool`, defaults to `False`): recompute activations in the
            backward pass; ~20-30 % slower, much less activation memory (TRL's default is True).
        seed (`int`, defaults to `0`): seeds the adapter init, the data order and dropout.

        > Sequence lengths (the system prompt is never truncated)

        max_length (`int`, defaults to `2048`): prompt + response tokens (reference recipe).
            Responses are cut at the end to fit.
        max_prompt_length (`int`, defaults to `256`): prompt tokens after the chat template
            (reference recipe). The user task is cut at its end to fit; the system turn never.
            A row whose system turn alone does not fit is dropped and reported.

        > Memory

        quantization (`str`, defaults to `"none"`): base weights in `"4bit"` (NF4, double
            quantization; QLoRA, as in the reference recipe) or `"8bit"` (LLM.int8) through
            bitsandbytes, or `"none"`. Made for CUDA; bitsandbytes 0.50 also runs both on CPU
            (slowly). Default `"none"` because CPU/debug runs are the default mode.

        > Checkpoints and logs

        save_steps (`int`, defaults to `50`): save a resumable checkpoint every N optimizer steps;
            the last two are kept. Smaller = less work lost on preemption, more disk writes.
        logging_steps (`int`, defaults to `1`): log (and write to metrics.parquet) every N
            optimizer steps (TRL's default is 10).
    """

    lora_r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    beta: float = 0.1
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    per_device_batch_size: int = 1
    grad_accum: int = 4
    warmup_ratio: float = 0.1
    max_length: int = 2048
    max_prompt_length: int = 256
    optim: str = "adamw_torch"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    save_steps: int = 50
    seed: int = 0
    precompute_ref_log_probs: bool = False
    logging_steps: int = 1

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(self.lora_r >= 1, f"train.lora_r must be >= 1, got {self.lora_r}")
        need(self.lora_alpha > 0, f"train.lora_alpha must be > 0, got {self.lora_alpha}")
        need(
            0.0 <= self.lora_dropout < 1.0,
            f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}",
        )
        mods = list(self.target_modules)
        need(
            bool(mods) and all(isinstance(m, str) and m.strip() for m in mods),
            f"train.target_modules must be a non-empty list of module names, got {mods}",
        )
        need(
            "lm_head" not in mods,
            "train.target_modules must not contain 'lm_head' (TRL computes "
            "log-probs from lm_head.weight directly, so its adapter would never train); remove it",
        )
        need(self.beta > 0, f"train.beta must be > 0, got {self.beta}")
        need(
            self.max_steps == -1 or self.max_steps >= 1,
            f"train.max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}",
        )
        need(
            self.max_steps >= 1 or self.epochs > 0,
            f"train.epochs must be > 0 when max_steps is -1, got {self.epochs}",
        )
        need(self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        need(
            self.per_device_batch_size >= 1,
            f"train.per_device_batch_size must be >= 1, got {self.per_device_batch_size}",
        )
        need(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        need(
            0.0 <= self.warmup_ratio < 1.0,
            f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}",
        )
        need(
            self.max_prompt_length >= 1,
            f"train.max_prompt_length must be >= 1, got {self.max_prompt_length}",
        )
        need(
            self.max_length > self.max_prompt_length,
            f"train.max_length must be > train.max_prompt_length (room for the response), got "
            f"max_length={self.max_length}, max_prompt_length={self.max_prompt_length}",
        )
        need(bool(self.optim.strip()), "train.optim must name a transformers optimizer, got ''")
        need(
            self.quantization in QUANTIZATIONS,
            f"train.quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}",
        )
        need(self.save_steps >= 1, f"train.save_steps must be >= 1, got {self.save_steps}")
        need(self.logging_steps >= 1, f"train.logging_steps must be >= 1, got {self.logging_steps}")
        need(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        from cpt.config import ConfigError

        if len(problems) == 1:
            raise ConfigError(problems[0])
        if problems:
            raise ConfigError(
                "TrainConfig is not well-formed, found the following errors:\n  "
                + "\n  ".join(problems)
            )


@dataclass
class TrainResult:
    """What `train_dpo` produced (paths exist on every rank once it returns).

    losses: the logged training loss per logged step (the whole run, resumed or not).
    steps: optimizer steps done in total. samples_per_s: preference rows per second over the
    optimizer steps this launch ran (all processes). resumed_from_step: the checkpoint step this
    launch started from, None for a fresh start.
    """

    adapter_dir: Path
    metrics_path: Path
    losses: list[float]
    steps: int
    samples_per_s: float
    resumed_from_step: int | None


# ------------------------------------------------------------------ fitting rows to lengths


class UnfittableRow(ValueError):
    """A row whose system turn and chat template alone exceed `max_prompt_length`."""


def _n_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> int:
    # Exactly how TRL 1.16 tokenizes conversational rows (trl.data_utils._tokenize).
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return len(enc["input_ids"])


def _token_cuts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """Prefixes of `text` ending on token boundaries: cuts[k] = the first k tokens' text."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends, last = [0], 0
        for _, end in enc["offset_mapping"]:
            last = max(last, end)
            ends.append(last)
        return [text[:e] for e in ends]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]


def _longest_fitting(cuts: list[str], fits: Callable[[str], bool]) -> int:
    """Largest k with fits(cuts[k]) (binary search; fits(cuts[0]) is checked by the caller)."""
    lo, hi = 0, len(cuts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cuts[mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_example(
    prompt: Sequence[dict[str, str]],
    chosen: Sequence[dict[str, str]],
    rejected: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    system_role: bool = True,
) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """One preference row as TRL should see it, within the token limits, system turn intact.

    The prompt is folded for models without a system role (`fold_system`), then the last user
    turn (the task) is cut at its end, on a token boundary, until the chat-templated prompt
    (with the generation prompt) has at most `max_prompt_length` tokens. Each response is then
    cut at its end until prompt + response has at most `max_length` tokens (the template still
    closes the turn).

    Returns (prompt, chosen, rejected, info) with info = {prompt_tokens, prompt_truncated,
    chosen_truncated, rejected_truncated}.

    Raises:
        UnfittableRow: if the system turn and template alone exceed `max_prompt_length`.
        ValueError: if the prompt has no user turn or a response is not one assistant turn.
    """
    msgs = [dict(m) for m in prompt]
    task_at = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if task_at is None:
        raise ValueError(f"prompt has no user turn (roles: {[m['role'] for m in msgs]})")
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or resp[-1]["role"] != "assistant":
            raise ValueError(
                f"{name} must end with an assistant turn, got roles {[m['role'] for m in resp]}"
            )
    task = msgs[task_at]["content"]

    def with_task(text: str) -> list[dict[str, str]]:
        out = [dict(m) for m in msgs]
        out[task_at]["content"] = text
        return fold_system(out, system_role)

    def prompt_fits(text: str) -> bool:
        return _n_tokens(tokenizer, with_task(text), True) <= max_prompt_length

    prompt_truncated = False
    if not prompt_fits(task):
        if not prompt_fits(""):
            bare = _n_tokens(tokenizer, with_task(""), True)
            raise UnfittableRow(
                f"the system turn and chat template alone take {bare} tokens, more than "
                f"train.max_prompt_length={max_prompt_length}; raise max_prompt_length or shorten "
                "the system prompt (cpt never truncates the system turn)"
            )
        cuts = _token_cuts(tokenizer, task)
        task = cuts[_longest_fitting(cuts, prompt_fits)]
        prompt_truncated = True
    final_prompt = with_task(task)

    def fit_response(resp: Sequence[dict[str, str]]) -> tuple[list[dict], bool]:
        resp = [dict(m) for m in resp]
        text = resp[-1]["content"]

        def with_text(t: str) -> list[dict[str, str]]:
            return [*resp[:-1], {**resp[-1], "content": t}]

        def fits(t: str) -> bool:
            return _n_tokens(tokenizer, final_prompt + with_text(t), False) <= max_length

        if fits(text):
            return resp, False
        cuts = _token_cuts(tokenizer, text)
        return with_text(cuts[_longest_fitting(cuts, fits)]), True

    chosen_out, chosen_cut = fit_response(chosen)
    rejected_out, rejected_cut = fit_response(rejected)
    info = {
        "prompt_tokens": _n_tokens(tokenizer, final_prompt, True),
        "prompt_truncated": prompt_truncated,
        "chosen_truncated": chosen_cut,
        "rejected_truncated": rejected_cut,
    }
    return final_prompt, chosen_out, rejected_out, info


def prepare_rows(
    rows: pa.Table, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, system_role: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows -> TRL rows (prompt, chosen, rejected) fitted by `fit_example`, + stats.

    Rows that cannot fit (system turn too long) are dropped, logged and counted in the stats.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"preference rows lack column(s) {missing} (have {rows.column_names}); "
            "expected TRL conversational rows: id, prompt, chosen, rejected"
        )
    out, dropped, first_reason = [], [], ""
    stats = {
        "rows": rows.num_rows,
        "prompts_truncated": 0,
        "responses_truncated": 0,
        "max_prompt_tokens": 0,
    }
    for row in rows.select(list(REQUIRED_COLUMNS)).to_pylist():
        try:
            prompt, chosen, rejected, info = fit_example(
                row["prompt"],
                row["chosen"],
                row["rejected"],
                tokenizer,
                max_prompt_length=cfg.max_prompt_length,
                max_length=cfg.max_length,
                system_role=system_role,
            )
        except UnfittableRow as exc:
            dropped.append(row["id"])
            first_reason = first_reason or f"row {row['id']}: {exc}"
            continue
        except ValueError as exc:
            raise ValueError(f"preference row {row['id']!r}: {exc}") from None
        stats["prompts_truncated"] += info["prompt_truncated"]
        stats["responses_truncated"] += info["chosen_truncated"] + info["rejected_truncated"]
        stats["max_prompt_tokens"] = max(stats["max_prompt_tokens"], info["prompt_tokens"])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    stats["dropped"] = len(dropped)
    stats["dropped_ids"] = dropped[:20]
    if not out:
        raise ValueError(f"no preference row fits: {first_reason}")
    if dropped:  # one line, not one per row: a too-small limit usually hits most rows
        log.warning(
            "train: dropped %d of %d rows that cannot fit train.max_prompt_length=%d (ids %s%s); "
            "first: %s",
            len(dropped), rows.num_rows, cfg.max_prompt_length, dropped[:5],
            ", ..." if len(dropped) > 5 else "", first_reason,
        )  # fmt: skip
    return out, stats


def _rows_fingerprint(rows: pa.Table) -> str:
    """Hash of the training-relevant columns (what checkpoints and a finished run belong to)."""
    sink = io.BytesIO()
    pq.write_table(rows.select(list(REQUIRED_COLUMNS)), sink, compression="none")
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


# ------------------------------------------------------------------ distributed environment


def distributed_env_from_slurm() -> dict[str, str]:
    """Export RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for
    `torch.distributed` (env://) from Slurm, and return them.

    - Already set (torchrun, or a launcher that set RANK and WORLD_SIZE): left as they are.
    - Inside a submitit task: `submitit.helpers.TorchDistributedEnvironment` (master = first host
      of the job, port from MASTER_PORT or derived from the job id).
    - Under plain `srun`: the same mapping from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
      first host of SLURM_JOB_NODELIST (submitit's node-list parser), same port rule.
    - Neither: nothing is exported (single process) and {} is returned.

    CUDA_VISIBLE_DEVICES is not touched: with one task per GPU, the device is `cuda:LOCAL_RANK`.
    """
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {k: os.environ[k] for k in keys if k in os.environ}
    if "SLURM_PROCID" not in os.environ:
        return {}
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        values = {
            "RANK": env.rank,
            "LOCAL_RANK": env.local_rank,
            "WORLD_SIZE": env.world_size,
            "LOCAL_WORLD_SIZE": env.local_world_size,
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": env.master_port,
        }
    else:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        port = os.environ.get("MASTER_PORT") or random.Random(job.job_id).randint(20000, 60000)
        values = {
            "RANK": job.global_rank,
            "LOCAL_RANK": job.local_rank,
            "WORLD_SIZE": job.num_tasks,
            "LOCAL_WORLD_SIZE": max(1, job.num_tasks // max(1, job.num_nodes)),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": port,
        }
    values = {k: str(v) for k, v in values.items()}
    os.environ.update(values)
    return values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_single_process_env() -> None:
    # DeepSpeed always initialises torch.distributed (env://), even for one process.
    if "RANK" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(_free_port()),
            }
        )


# ------------------------------------------------------------------ checkpoints and files


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


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder `tmp` at `dest` (readers see the old one or the new one)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _metrics_table(log_history: list[dict[str, Any]]) -> pa.Table:
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


def _write_parquet(path: Path, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue())


# ------------------------------------------------------------------ model


def _deepspeed_file(deepspeed: DeepSpeedConfig | None) -> Path | None:
    from cpt.config import ConfigError, resolve_path

    if deepspeed is None or deepspeed.name == "none":
        return None
    path = resolve_path(deepspeed.config_file) if deepspeed.config_file else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"deepspeed.config_file: {deepspeed.config_file!r} not found for "
            f"deepspeed={deepspeed.name} (e.g. conf/deepspeed/zero2.json)"
        )
    return path


def _zero_stage(ds_file: Path | None) -> int:
    if ds_file is None:
        return 0
    return int(json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage", 0))


def _load_model(
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


def _save_adapter(trainer, tokenizer, dest: Path) -> None:
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
        _replace_dir(tmp, dest)


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

    Raises:
        ValueError: rows without the required columns, or none fitting `max_prompt_length`.
        ConfigError: a missing DeepSpeed file, or `out_dir` holding checkpoints of another run.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from cpt.config import ConfigError
    from cpt.models import resolve_model_path

    out_dir = Path(out_dir)
    use_cpu = (not torch.cuda.is_available()) if use_cpu is None else use_cpu
    ds_file = _deepspeed_file(deepspeed)
    if ds_file is not None:
        _ensure_single_process_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
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

    key = _run_key(
        cfg,
        student,
        _rows_fingerprint(train_rows),
        _rows_fingerprint(eval_rows) if eval_rows is not None else None,
        deepspeed.name if ds_file else "none",
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
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(key_path, {"run_key": key})
        _drop_incomplete_checkpoints(ckpt_dir)
    resume = latest_checkpoint(ckpt_dir)

    has_eval = eval_data is not None
    args = DPOConfig(
        output_dir=str(ckpt_dir),
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
        save_total_limit=SAVE_TOTAL_LIMIT,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.save_steps if has_eval else None,
        logging_steps=cfg.logging_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,  # data order and RNG come back exactly on resume
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        bf16=not use_cpu and torch.cuda.is_bf16_supported(),
        fp16=False,
        ddp_backend="gloo" if use_cpu and (world > 1 or ds_file is not None) else None,
        deepspeed=str(ds_file) if ds_file else None,
        trust_remote_code=student.trust_remote_code,
    )
    # After DPOConfig: under ZeRO-3 from_pretrained then builds the model already sharded.
    model = _load_model(student, cfg, model_path, use_cpu, _zero_stage(ds_file))
    quantized = (
        "4bit"
        if getattr(model, "is_loaded_in_4bit", False)
        else "8bit"
        if getattr(model, "is_loaded_in_8bit", False)
        else None
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    timer = _StepTimer()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_data),
        eval_dataset=Dataset.from_list(eval_data) if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[timer.callback(), *(callbacks or [])],
    )
    resumed_from = int(resume.name.removeprefix(CHECKPOINT_PREFIX)) if resume else None
    if resume:
        log.info("train: resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_metrics = trainer.evaluate() if has_eval else None

    rows_per_step = cfg.per_device_batch_size * cfg.grad_accum * world
    samples_per_s = timer.steps() * rows_per_step / timer.seconds() if timer.seconds() else 0.0
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    _save_adapter(trainer, tokenizer, out_dir / "adapter")
    if trainer.is_world_process_zero():
        _write_parquet(out_dir / "metrics.parquet", _metrics_table(trainer.state.log_history))
        summary = {
            "run_key": key,
            "train": dataclasses.asdict(cfg),
            "student": {
                "name": student.name,
                "path": student.path,
                "revision": student.revision,
                "system_role": student.system_role,
            },
            "deepspeed": deepspeed.name if ds_file else "none",
            "world_size": world,
            "device": "cpu" if use_cpu else torch.cuda.get_device_name(),
            "base_quantized": quantized,
            "data": train_stats,
            "eval_data": eval_stats,
            "eval": eval_metrics,
            "steps": trainer.state.global_step,
            "losses": losses,
            "final_loss": losses[-1] if losses else None,
            "samples_per_s": samples_per_s,
            "steps_this_launch": timer.steps(),
            "seconds_this_launch": timer.seconds(),
            "resumed_from_step": resumed_from,
            "versions": package_versions(),
        }
        atomic_write_json(summary_path, summary)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(
        adapter_dir=out_dir / "adapter",
        metrics_path=out_dir / "metrics.parquet",
        losses=losses,
        steps=trainer.state.global_step,
        samples_per_s=samples_per_s,
        resumed_from_step=resumed_from,
    )


# ------------------------------------------------------------------ command line


def read_rows(paths: Sequence[str | Path]) -> pa.Table:
    """Parquet files, or folders searched recursively for *.parquet, as one table."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {[str(p) for p in paths]}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": f"train.{f.name} (default: {default})",
        }
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            kw["type"] = {"int": int, "float": float}.get(str(f.type), type(default))
        parser.add_argument(*names, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    from cpt.config import DeepSpeedConfig, DType, ModelConfig

    parser = argparse.ArgumentParser(
        prog="python -m cpt.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        required=True,
        help="preference rows: Parquet file(s) or folder(s) of them",
    )
    parser.add_argument("--eval-rows", nargs="+", default=None, help="held-out rows (optional)")
    parser.add_argument(
        "--student-path",
        required=True,
        help="HF id, local folder, or builtin:tiny / builtin:tiny_nosys",
    )
    parser.add_argument("--student-name", default=None, help="label (default: last path part)")
    parser.add_argument("--revision", default="main")
    parser.add_argument("--dtype", default="auto", choices=[d.value for d in DType])
    parser.add_argument(
        "--system-role",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-system-role folds the system prompt into the first user turn",
    )
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--out", required=True, help="train folder (re-use it to resume)")
    parser.add_argument(
        "--deepspeed",
        default="",
        help="DeepSpeed JSON, e.g. conf/deepspeed/zero2.json (empty: none)",
    )
    parser.add_argument(
        "--cpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force CPU / GPU (default: CPU when CUDA is absent)",
    )
    _add_config_options(parser)
    ns = parser.parse_args(argv)

    overrides = {
        f.name: getattr(ns, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(ns, f.name) is not None
    }
    cfg = TrainConfig(**overrides)  # a bad value stops here, before any model or process group
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    distributed_env_from_slurm()
    name = ns.student_name or ns.student_path.rstrip("/").split("/")[-1].split(":")[-1]
    student = ModelConfig(
        name=name,
        path=ns.student_path,
        revision=ns.revision,
        dtype=DType(ns.dtype),
        system_role=ns.system_role,
        trust_remote_code=ns.trust_remote_code,
    )
    ds = (
        DeepSpeedConfig(name=Path(ns.deepspeed).stem, config_file=ns.deepspeed)
        if ns.deepspeed
        else None
    )
    result = train_dpo(
        cfg,
        student,
        read_rows(ns.rows),
        Path(ns.out),
        eval_rows=read_rows(ns.eval_rows) if ns.eval_rows else None,
        deepspeed=ds,
        use_cpu=ns.cpu,
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
