"""Slurm job states and the per-stage ledger: what Slurm says about a job (squeue for live
jobs, sacct for finished ones), and `job.json` in a stage folder naming the stage's current
job (earlier jobs kept in its history). A stage whose ledger job is still in flight is not
submitted again; `stage=status` reads the same ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt import store

LEDGER = "job.json"
SLURM_SUBDIR = ".slurm"

# Slurm job states (squeue %T / sacct State) in which the job may still run and succeed.
IN_FLIGHT = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "CONFIGURING",
        "COMPLETING",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)


class SlurmError(store.StoreError):
    """A stage job failed or Slurm could not be used; the message names the job and its log."""


# ------------------------------------------------------------------ slurm commands


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class JobState:
    """What Slurm says about a job: state (e.g. RUNNING), reason (e.g. Dependency)."""

    job_id: str
    state: str
    reason: str = ""

    @property
    def in_flight(self) -> bool:
        return self.state in IN_FLIGHT

    @property
    def cancelled_by_dependency(self) -> bool:
        """Cancelled because an input's job failed (--kill-on-invalid-dep). sacct keeps the
        last pending reason, "Dependency"; squeue says "DependencyNeverSatisfied"."""
        return self.state == "CANCELLED" and self.reason.startswith("Dependency")


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """Current state of each job Slurm knows: squeue for live jobs (authoritative, no lag),
    sacct for finished ones. A job neither knows is missing from the result."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or not have_slurm():
        return {}
    out: dict[str, JobState] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
        for line in proc.stdout.splitlines():
            jid, state, reason = [*line.split("|"), "", ""][:3]
            if jid.strip() in ids:
                out[jid.strip()] = JobState(jid.strip(), state.strip(), reason.strip())
    rest = [j for j in ids if j not in out or not out[j].in_flight]
    if rest and shutil.which("sacct"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = _run(
                ["sacct", "-X", "-n", "-P", "-j", ",".join(rest), "-o", "JobIDRaw,State,Reason"]
            )
            for line in proc.stdout.splitlines():
                jid, state, reason = [*line.split("|"), "", ""][:3]
                state = state.split()[0] if state.strip() else ""  # "CANCELLED by 0"
                if jid in rest and state and (jid not in out or state not in IN_FLIGHT):
                    out[jid] = JobState(jid, state, reason)
    return out


# ------------------------------------------------------------------------ ledger


def ledger_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / LEDGER


def read_ledger(stage_dir: Path) -> dict[str, Any] | None:
    path = ledger_path(stage_dir)
    if not path.exists():
        return None
    with contextlib.suppress(store.StoreError):
        return store.read_json(path)
    return None


def write_ledger(stage_dir: Path, entry: dict[str, Any]) -> None:
    """Record the stage's current job; earlier jobs of the stage are kept in `history`."""
    prior = read_ledger(stage_dir) or {}
    history = list(prior.pop("history", []))
    if prior.get("job_id") and prior.get("job_id") != entry.get("job_id"):
        history.append(prior)
    entry = store.redact({**entry, "history": history})  # argv may carry a secret
    store.atomic_write_json(ledger_path(stage_dir), entry)


@contextlib.contextmanager
def submission_lock(run_dir: Path) -> Iterator[None]:
    """Serialise submissions to one run folder (several sweep drivers at once). The folder
    holds the job pickles that jobs unpickle and run: private (0700); the lock file is never
    followed through a symlink."""
    path = store.private_dir(Path(run_dir) / SLURM_SUBDIR) / "submit.lock"
    fd = store.open_lock(path)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks while another driver submits
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)
