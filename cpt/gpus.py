"""What GPUs this machine gives this process, asked of the NVIDIA driver (`nvidia-smi`).

Not torch: `import torch` costs a launch seconds before any stage runs, and the launcher
only needs to know whether there is a GPU (`train=auto`, Ray's GPU count) and its name (the
planner's throughput key). Workers that run models still ask torch.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess


@functools.lru_cache(maxsize=1)
def driver_gpu_names() -> tuple[str, ...]:
    """Every GPU the driver lists (empty without a driver or `nvidia-smi`)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip())


def _visible_ids() -> list[str] | None:
    """`CUDA_VISIBLE_DEVICES` as a list (None: not set, every GPU is visible)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    ids = []
    for d in (d.strip() for d in visible.split(",")):
        if not d or d == "-1":
            break  # CUDA stops at the first invalid entry
        ids.append(d)
    return ids


def machine_gpus() -> int:
    """GPUs this process may use: those the driver lists, limited by `CUDA_VISIBLE_DEVICES`."""
    names, ids = driver_gpu_names(), _visible_ids()
    return len(names) if ids is None else min(len(ids), len(names))


def gpu_name() -> str | None:
    """The name of the first GPU this process sees (None: it sees none)."""
    names, ids = driver_gpu_names(), _visible_ids()
    if not machine_gpus():
        return None
    first = ids[0] if ids else "0"
    return names[int(first)] if first.isdigit() and int(first) < len(names) else names[0]
