"""Preemption without USR2, and drivers that must not wait inside an allocation.

- SIGTERM while a stage job is RUNNING (sites that preempt with SIGTERM only) does what USR2
  does (submitit's save-and-requeue); a SIGTERM from `scancel` (job COMPLETING) just ends it.
- Training saves by wall clock too (`cluster.checkpoint_every_min`), for kills without signal.
- `wait=true` inside a Slurm job is refused before anything is submitted.

    pytest tests/test_preemption.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, has_slurm

JOB = """#!/bin/bash
#SBATCH -c 1 -t 5 -o {out}
exec {python} - <<'PY'
import os, signal, subprocess, sys, time
from pathlib import Path
marker = Path({marker!r})
def usr2(signum, frame):  # stands in for submitit's checkpoint-and-requeue handler
    marker.write_text(f"USR2 handler for {{signal.Signals(signum).name}}")
    if {requeue!r}:  # as submitit does: `scontrol requeue` (which SIGTERMs this job), exit
        subprocess.check_call(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
        time.sleep(2)  # the requeue's SIGTERM arrives meanwhile (KillWait: SIGKILL later)
        marker.write_text(marker.read_text() + ", requeued, exited")
    sys.exit(0)
signal.signal(signal.SIGUSR2, usr2)
from cpt.slurm.submit import requeue_on_sigterm
requeue_on_sigterm()
Path({ready!r}).write_text("ready")
time.sleep(120)
PY
"""


def _submit(tmp: Path, name: str, requeue: bool = False) -> tuple[str, Path, Path]:
    marker, ready, out = tmp / f"{name}.marker", tmp / f"{name}.ready", tmp / f"{name}.out"
    script = tmp / f"{name}.sh"
    script.write_text(
        JOB.format(
            out=out, python=sys.executable, marker=str(marker), ready=str(ready), requeue=requeue
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    jid = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    return jid, marker, ready


def _wait(what, ok, jid: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ok():
        if time.time() > deadline:
            subprocess.run(["scancel", jid])
            pytest.fail(f"job {jid}: {what} did not happen in {timeout} s")
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.skipif(not has_slurm(), reason="no Slurm cluster answers (sbatch/sinfo)")
def test_sigterm_while_running_requeues_like_usr2_but_scancel_does_not(tmp_path):
    preempted, marker, ready = _submit(tmp_path, "preempted")
    cancelled, marker2, ready2 = _submit(tmp_path, "cancelled")
    _wait("start", ready.exists, preempted)
    subprocess.run(["scancel", "--signal=TERM", "--batch", preempted], check=True)
    _wait("the USR2 handler", marker.exists, preempted)
    assert marker.read_text() == "USR2 handler for SIGTERM"
    _wait("start", ready2.exists, cancelled)
    subprocess.run(["scancel", cancelled], check=True)  # a user's cancel: TERM, then KILL
    time.sleep(5)  # a grace period for a wrong handler to act; never an assertion on time
    assert not marker2.exists(), "a cancelled job must not be requeued"


@pytest.mark.slurm
@pytest.mark.skipif(not has_slurm(), reason="no Slurm cluster answers (sbatch/sinfo)")
def test_the_requeues_own_sigterm_lets_the_usr2_handler_finish(tmp_path):
    """`scontrol requeue` in the USR2 handler SIGTERMs the job; that SIGTERM must neither
    re-enter the handler nor cut it short (CI once saw no "Requeued job" line)."""
    jid, marker, ready = _submit(tmp_path, "requeued", requeue=True)
    try:
        _wait("start", ready.exists, jid)
        subprocess.run(["scancel", "--signal=USR2", "--batch", jid], check=True)
        _wait("the handler's end", lambda: "exited" in _read(marker), jid, timeout=120)
        assert _read(marker) == "USR2 handler for SIGUSR2, requeued, exited"
    finally:
        subprocess.run(["scancel", jid])


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_a_driver_never_waits_inside_an_allocation(tmp_path, monkeypatch):
    """wait=true inside a Slurm job (a `hydra/launcher=slurm` driver) is refused before any
    submission: the waiting driver would hold what its stage jobs need."""
    from cpt import pipeline
    from cpt.slurm import SlurmError

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("CPT_STAGE_JOB", raising=False)
    with pytest.raises(SlurmError, match=r"wait=true inside Slurm job 4242: .*deadlock"):
        pipeline.run(compose(f"run_dir={tmp_path}", "cluster=ci", "wait=true"))
    assert not (tmp_path / ".slurm").exists()  # nothing submitted, nothing written


@pytest.mark.slow
def test_training_checkpoints_by_wall_clock_without_any_signal(tmp_path):
    """save_steps far away; the wall-clock callback saves anyway (every step here)."""
    import pyarrow as pa

    from cpt.config import ModelConfig, TrainConfig
    from cpt.recipe import wall_clock_checkpoints
    from cpt.train import train_dpo

    rows = pa.Table.from_pylist(
        [
            {
                "id": f"p{i}",
                "prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": f"Task {i}."}],
                "chosen": [{"role": "assistant", "content": "Short."}],
                "rejected": [{"role": "assistant", "content": "A much longer answer."}],
            }
            for i in range(8)
        ]
    )  # fmt: skip
    cfg = TrainConfig(
        max_steps=3, save_steps=1000, grad_accum=1, max_length=128, max_prompt_length=64
    )
    tiny = ModelConfig(name="tiny", path="builtin:tiny")
    every = 1e-9  # minutes: as if each step took longer than the limit
    on, off = tmp_path / "on", tmp_path / "off"
    train_dpo(cfg, tiny, rows, on, use_cpu=True, callbacks=[wall_clock_checkpoints(every)])
    train_dpo(cfg, tiny, rows, off, use_cpu=True, callbacks=[wall_clock_checkpoints(0)])
    saved_on = sorted((on / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    saved_off = list((off / "checkpoints").glob("checkpoint-*"))
    # off: only the final save; on: a save every step (the last two are kept)
    assert len(saved_off) == 1 and len(saved_on) == 2, (saved_on, saved_off)
    assert saved_on[-1].name == saved_off[0].name
    assert int(saved_on[0].name[11:]) == int(saved_on[1].name[11:]) - 1
