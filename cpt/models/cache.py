"""The model cache: folders built once, atomically, by one builder at a time.

Every built model (the tiny random models, GGUF files converted to safetensors, the built-in
SmolLM2) lives in `<CPT_CACHE_DIR or ~/.cache/cpt>/models/<name>-<key>`, where the key hashes
everything that shapes the files (recipe version, inputs, library versions). A folder exists
completely or not at all: it is built under a temporary name and renamed; concurrent builders
(test workers, Ray actors, Slurm jobs on a shared file system) wait on a lock file and reuse
the first one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("CPT_CACHE_DIR", Path.home() / ".cache" / "cpt")) / "models"


def build_once(target: Path, build: Callable[[Path], None], marker: str) -> Path:
    """`target`, built by `build(tmp_folder)` unless `target/marker` already exists.

    Safe under concurrency (an exclusive lock per target) and against kills (the folder only
    appears by rename once `build` returned).
    """
    if (target / marker).exists():
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse
        if not (target / marker).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)
    return target
