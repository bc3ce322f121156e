"""Reference log-prob tables: the DPO reference forward run once, stored as Parquet, and reused
by every student run that shares it (a `train.beta` sweep, seeds, learning rates).

With LoRA the reference is the base model with its adapters disabled, so it never changes while
training: each row's summed log-probs of its chosen and rejected completion depend only on the
base weights, their precision and the row's token ids. Without a table DPO pays one reference
forward per step (and per evaluation); with one, the forward runs once per table and each run
only reads it.

Layout (`<run_dir>/reflogps/`, beside the stage folders; one folder per content key)::

    <student>-<key12>/shards/part-00000.parquet   id (row hash), ref_chosen_logps, ref_rejected_logps
    <student>-<key12>/shards/part-00000.json      its receipt: rows, bytes, sha256
    <student>-<key12>/manifest.json               key, what it was computed from, the HF check
    <student>-<key12>/_SUCCESS                    written last
    <student>-<key12>/.lock                       held while one process builds it

The key (`table_key`) hashes exactly what changes the values: the model's identity (path,
revision, the resolved weights' files or hub commit, dtype, quantization), the precision the
forward runs in, TRL's `max_length` cut, the token ids of every row (so the chat template,
tokenizer, max lengths and the pairs data are all in it) and the versions of torch,
transformers and TRL. β, learning rate, seed, LoRA shape and steps are not in it.

A table is built under the folder's lock, exactly once: a second process waits, then reads it.
A table whose checksum, key, columns or rows do not match is rebuilt, never read. The values
come from TRL's own per-batch reference function (`DPOTrainer.compute_ref_log_probs`, the one
its `precompute_ref_log_probs` path runs) and, when built, are checked against a plain HF
forward on a few rows. With several ranks every rank computes its share (the trainer's
dataloader split, gathered), rank 0 alone writes. With `train.ref_table=auto` a run that
reads only part of its training rows (a few steps) reads a table that exists but builds none
(`rows_read`): the build's forward over every row would cost it more than it saves.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from cpt import store
from cpt.config import ModelConfig

log = logging.getLogger("cpt.train")

COLUMNS = ("id", "ref_chosen_logps", "ref_rejected_logps")
CHECK_ROWS = 2  # rows whose stored values are re-derived with a plain HF forward on a build
BATCH_ROWS = 8  # rows per batch of the build's forward (no gradients, rows sorted by length)
_NUMERIC_PACKAGES = ("torch", "transformers", "trl")  # their versions are in the key


@dataclass
class TableUse:
    """How a run got its reference log-probs (the train manifest's `ref_table`).

    status: "computed" (this run built the table), "reused" (read a table already built) or
    "live" (`train.ref_table=auto` and a table would not pay: the reference forward ran in
    the trainer, `why` says so). path / key: the table's folder and content key (for "live":
    where it would be). waited_s: time spent waiting for another process building the same
    table. check: the HF-forward comparison made when it was built.
    """

    status: str
    path: str
    key: str
    rows: int
    seconds: float
    waited_s: float = 0.0
    check: dict[str, Any] | None = None
    why: str = ""


# ---------------------------------------------------------------------------- keys


def row_id(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """A row's identity: the hash of its token ids as the trainer feeds them."""
    h = hashlib.sha256()
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        h.update(len(ids).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
    return h.hexdigest()[:24]


def row_ids(dataset) -> list[str]:
    """Row ids of a tokenized DPO dataset (TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`)."""
    cols = [dataset[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return [row_id(p, c, r) for p, c, r in zip(*cols, strict=True)]


def weights_identity(model_path: str, revision: str) -> dict[str, Any]:
    """What names the weights exactly: a local folder's files (name, size, mtime), or the hub
    commit the revision resolved to in the local cache (the revision itself if not cached)."""
    folder = Path(model_path)
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return {"files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    commit = None
    with contextlib.suppress(ImportError, OSError, ValueError):  # not cached: the revision names it
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_path, "config.json", revision=revision)
        if isinstance(found, str):
            commit = Path(found).parent.name
    return {"hub": model_path, "revision": revision, "commit": commit}


def table_key(model: dict[str, Any], precision: str, max_length: int | None, ids: list[str]) -> str:
    """The content key of a table: model identity, precision, TRL's cut and the rows' ids."""
    versions = {k: v for k, v in store.package_versions().items() if k in _NUMERIC_PACKAGES}
    return store.content_hash(
        {
            "model": model,
            "precision": precision,
            "max_length": max_length,
            "truncation_mode": "keep_start",
            "rows": store.content_hash(sorted(set(ids)), 32),
            "versions": versions,
        },
        32,
    )


# ------------------------------------------------------------------------- storage


def load_table(folder: Path, key: str, expect: set[str] | None = None) -> pa.Table | None:
    """The finished, intact table of `key` in `folder` holding every row id of `expect`, or
    None (absent, partial, corrupt, another key's); what is wrong is logged, the caller
    rebuilds it."""
    if not store.is_done(folder):
        return None
    try:
        manifest = store.read_json(folder / store.MANIFEST)
        if manifest.get("key") != key:
            raise store.StoreError(f"key {manifest.get('key')} != {key}")
        table = store.read_shards(folder, 1)
        if tuple(table.column_names) != COLUMNS or table.num_rows != manifest.get("rows"):
            raise store.StoreError(f"columns {table.column_names}, rows {table.num_rows}")
        values = table["ref_chosen_logps"].to_pylist() + table["ref_rejected_logps"].to_pylist()
        if not all(v is not None and math.isfinite(v) for v in values):
            raise store.StoreError("non-finite values")
        if expect is not None and not expect <= set(table["id"].to_pylist()):
            raise store.StoreError("rows missing")
    except (store.StoreError, OSError, pa.ArrowException) as exc:
        log.warning("train: reference table %s is unusable (%s); rebuilding it", folder, exc)
        return None
    return table


def write_table(folder: Path, key: str, table: pa.Table, meta: dict[str, Any]) -> None:
    """Replace whatever `folder` holds by `table` (the done marker goes first and comes last,
    so a crash in between leaves a folder that reads as unfinished). Caller holds the lock."""
    (folder / store.DONE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(folder / "shards", ignore_errors=True)
    store.write_shard(folder, 0, table, {})
    store.mark_done(folder, {"key": key, "rows": table.num_rows, "n_shards": 1, **meta})


def obtain(
    folder: Path,
    key: str,
    compute: Callable[[], tuple[pa.Table, dict[str, Any]]],
    *,
    main: bool = True,
    agree: Callable[[bool], bool] = lambda have: have,
    expect: set[str] | None = None,
    build: bool = True,
) -> tuple[pa.Table | None, TableUse]:
    """The table of `key`: read if `folder` holds it intact, else computed and written, once
    (`build=False`: not built; None and a "live" use).

    compute: returns (table, meta); with several ranks every rank calls it (a collective).
    main: this process writes (rank 0). agree: rank 0's "have it" for every rank (a broadcast).
    expect: the row ids the table must hold.
    A builder holds the folder's lock; others wait on it, then read what it wrote.
    """
    t0 = time.perf_counter()
    waited = 0.0
    with contextlib.ExitStack() as stack:
        table = load_table(folder, key, expect) if main else None
        if main and table is None and build:
            stack.enter_context(store.stage_lock(folder, wait=True))
            waited = time.perf_counter() - t0
            table = load_table(folder, key, expect)  # another process may have built it meanwhile
        if agree(table is not None):
            table = table if table is not None else load_table(folder, key, expect)
            if table is None:
                raise store.StoreError(
                    f"{folder}: rank 0 found the reference table but this rank cannot read "
                    "it; the run folder must be on storage every rank shares"
                )
            seconds = time.perf_counter() - t0
            return table, TableUse("reused", str(folder), key, table.num_rows, seconds, waited)
        if not build:
            return None, TableUse("live", str(folder), key, 0, time.perf_counter() - t0)
        table, meta = compute()
        if main:
            write_table(folder, key, table, meta)
    use = TableUse("computed", str(folder), key, table.num_rows, time.perf_counter() - t0, waited)
    use.check = meta.get("check")
    return table, use


# ------------------------------------------------------------------------ the forward


def _datasets(trainer) -> dict[str, Any]:
    return {
        name: ds
        for name, ds in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset))
        if ds is not None
    }


def _forward(trainer, dataset, batch_size: int) -> tuple[list[float], list[float]]:
    """TRL's precompute loop (`DPOTrainer._precompute_ref_logps`) without its datasets cache
    file: the trainer's collator and reference function, the dataloader split over ranks
    (gathered back in dataset order). Rows go in by length, so batches pad little."""
    import torch
    from torch.utils.data import DataLoader

    cols = [dataset[c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*cols, strict=True)]
    order = sorted(range(len(dataset)), key=lengths.__getitem__)
    dataset = dataset.select(order)

    loader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    )
    model = trainer.model
    if _needs_engine(trainer):  # parameters sharded, or not yet on the device, before train()
        from trl.models import prepare_deepspeed

        model = prepare_deepspeed(trainer.model, trainer.accelerator)
    chosen, rejected = [], []
    for batch in loader:
        c, r = trainer.compute_ref_log_probs(model, batch)
        c, r = trainer.accelerator.gather_for_metrics((c, r))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    out_c, out_r = [0.0] * len(order), [0.0] * len(order)
    for i, c, r in zip(
        order, torch.cat(chosen).tolist(), torch.cat(rejected).tolist(), strict=True
    ):
        out_c[i], out_r[i] = c, r
    return out_c, out_r


def _needs_engine(trainer) -> bool:
    """Under DeepSpeed the model is placed by `train()`: ZeRO-3 shards its parameters, and on
    a GPU ZeRO-1/2 leave them on the CPU until then; TRL's precompute wraps it in an inference
    engine for the forward. On the CPU, ZeRO-1/2 parameters are already whole where they run."""
    if not trainer.is_deepspeed_enabled:
        return False
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    where, device = next(trainer.model.parameters()).device, trainer.accelerator.device
    return stage == 3 or where.type != device.type or (where.type == "cuda" and where != device)


def _hf_check(trainer, dataset, chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Re-derive the first rows' values with a plain HF forward (full logits, log-softmax, the
    base with adapters disabled) and fail the build if they disagree."""
    import torch

    if _needs_engine(trainer):
        return {"rows": 0, "skipped": "DeepSpeed places the parameters only when training starts"}
    model = trainer.accelerator.unwrap_model(trainer.model)
    device = next(model.parameters()).device
    fp32 = not (trainer.args.bf16 or trainer.args.fp16)
    max_length = trainer.args.max_length
    worst = 0.0
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), off, trainer.accelerator.autocast():
        for i in range(min(CHECK_ROWS, len(dataset))):
            row = dataset[i]
            for side, stored in (("chosen", chosen[i]), ("rejected", rejected[i])):
                ids = (row["prompt_ids"] + row[f"{side}_ids"])[:max_length]
                x = torch.tensor([ids], device=device)
                logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
                per_token = logp.gather(-1, x[0, 1:, None])[:, 0]
                value = float(per_token[len(row["prompt_ids"]) - 1 :].sum())
                tol = (1e-3 + 1e-4 * abs(value)) if fp32 else (0.25 + 1e-2 * abs(value))
                worst = max(worst, abs(value - stored))
                if abs(value - stored) > tol:
                    raise store.StoreError(
                        f"reference log-prob of row {i} ({side}): TRL's forward gave {stored:.6f}, "
                        f"a plain HF forward {value:.6f} (tolerance {tol:.2g}); the table is not "
                        "written: set train.ref_table=false and report this"
                    )
    return {"rows": min(CHECK_ROWS, len(dataset)), "max_abs_diff": worst, "fp32": fp32}


def rows_read(trainer) -> tuple[int, int]:
    """(training rows this run reads, rows in its training set): `max_steps` x the rows of one
    optimizer step over all ranks, or every row for a run of epochs."""
    args, n = trainer.args, len(trainer.train_dataset)
    if args.max_steps <= 0:
        return n, n
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return min(n, args.max_steps * per_step * args.world_size), n


def use_table(
    trainer,
    tables_dir: Path,
    student: ModelConfig,
    quantization: str,
    model_path: str,
    always: bool = True,
) -> TableUse:
    """Give `trainer` (a built `DPOTrainer`, LoRA, before `train()`) its reference log-probs
    from the shared table under `tables_dir`, building the table if needed; afterwards the
    trainer reads them from its batches instead of running the reference forward.

    always=False (`train.ref_table=auto`): a table that exists is read, but one is built only
    when this run reads every training row; otherwise the trainer keeps its live reference
    forward (status "live"): building costs one forward per train and held-out row, more than
    a run of a few steps spends on its reference."""
    from accelerate.utils import broadcast_object_list

    model = {
        "path": student.path,
        "gguf_file": student.gguf_file,
        "revision": student.revision,
        "dtype": str(trainer.model.dtype),
        "quantization": quantization,
        "weights": weights_identity(model_path, student.revision),
    }
    sets = _datasets(trainer)
    ids = {name: row_ids(ds) for name, ds in sets.items()}
    args = trainer.args
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    all_ids = [i for name in sets for i in ids[name]]
    key = table_key(model, precision, args.max_length, all_ids)
    folder = store.Store(tables_dir.parent).stage_dir(tables_dir.name, key, student.name)

    def compute() -> tuple[pa.Table, dict[str, Any]]:
        t = time.perf_counter()
        batch = args.precompute_ref_batch_size or max(BATCH_ROWS, args.per_device_train_batch_size)
        values = {name: _forward(trainer, ds, batch) for name, ds in sets.items()}
        main = trainer.accelerator.is_main_process
        check = _hf_check(trainer, sets["train"], *values["train"]) if main else None
        seen: dict[str, tuple[float, float]] = {}
        for name in sets:
            seen.update(zip(ids[name], zip(*values[name], strict=True), strict=True))
        table = pa.table(
            {
                "id": list(seen),
                "ref_chosen_logps": [v[0] for v in seen.values()],
                "ref_rejected_logps": [v[1] for v in seen.values()],
            }
        )
        meta = {"model": model, "precision": precision, "max_length": args.max_length}
        return table, {**meta, "check": check, "forward_seconds": time.perf_counter() - t}

    def agree(have: bool) -> bool:
        return bool(broadcast_object_list([have], from_process=0)[0])

    main = trainer.accelerator.is_main_process
    read, n_train = rows_read(trainer)
    build = always or read >= n_train
    table, use = obtain(
        folder, key, compute, main=main, agree=agree, expect=set(all_ids), build=build
    )
    if table is None:
        held = len(all_ids) - n_train
        use.why = (
            f"train.ref_table=auto: this run reads {read} of {n_train} training rows; a table "
            f"costs a forward for each of them and the {held} held-out rows (true: build anyway)"
        )
        log.info("train: live reference forward (%s)", use.why)
        return use
    lookup = dict(
        zip(
            table["id"].to_pylist(),
            zip(table["ref_chosen_logps"].to_pylist(), table["ref_rejected_logps"].to_pylist()),
            strict=True,
        )
    )
    for name, ds in sets.items():
        values = [lookup[i] for i in ids[name]]  # `obtain` checked that every id is there
        ds = ds.add_column("ref_chosen_logps", [v[0] for v in values])
        ds = ds.add_column("ref_rejected_logps", [v[1] for v in values])
        setattr(trainer, f"{name}_dataset", ds)
    trainer.precompute_ref_logps = True  # `_compute_loss` reads the batch's ref columns
    log.info(
        "train: reference log-probs %s (%d rows) %s %s",
        use.status, use.rows, "from" if use.status == "reused" else "into", folder,
    )  # fmt: skip
    return use
