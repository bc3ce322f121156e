"""status: where each stage of this config's pipeline stands in `run_dir`.

    python jobs/launch.py stage=status run_dir=<path> [the overrides of the run]

One line per stage: done / running (job id, shards done of total) / pending (job id, why)
/ failed (Slurm state, path of the job's log, its last line) / partial (shards on disk, no
job) / not started. Works without Slurm: then only what is on disk is shown. The job of a
stage comes from its ledger (`job.json` in the stage folder, written at submission).
Writes nothing.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from cpt import store
from cpt.graph import Node, RunPlan
from cpt.slurm import jobs


@dataclass
class StageStatus:
    stage: str
    state: str  # done | running | pending | failed | cancelled | partial | not started
    detail: str
    folder: Path
    job_id: str = ""
    log: str = ""
    note: str = ""  # e.g. the error line of a failed job's log


def _shards_total(plan: RunPlan, node: Node) -> int | None:
    with contextlib.suppress(Exception):
        for key, value in node.spec.plan(plan.cfg).items():
            if str(key).startswith("shards") and isinstance(value, int):
                return value
    return None


def _shards_done(folder: Path) -> int:
    return len(list((folder / "shards").glob(f"{store.SHARD_PREFIX}*.json")))


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def _error_line(path: str) -> str:
    """The last exception line of a job log (else its last meaningful line)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 32768))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith(("srun: ", "slurmstepd"))]
        errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
        return (errors or lines or [""])[-1][:240]
    return ""


def stage_status(plan: RunPlan) -> list[StageStatus]:
    rows = [(node, jobs.read_ledger(node.folder)) for node in plan.nodes.values()]
    states = jobs.job_states(e["job_id"] for _, e in rows if e and e.get("job_id"))
    out = []
    for node, entry in rows:
        name, folder = node.name, node.folder
        job_id = str(entry.get("job_id", "")) if entry else ""
        log_path = entry.get("stderr", "") if entry else ""
        job = f"job {job_id}" if job_id else ""
        total = _shards_total(plan, node)
        done_shards = _shards_done(folder)
        shards = f"{done_shards}/{total if total is not None else '?'} shards"
        if node.done:
            detail = "done"
            with contextlib.suppress(store.StoreError, OSError):
                m = store.read_json(folder / store.MANIFEST)
                detail = (
                    f"{m.get('n_shards', 0)} shards, {m.get('rows', '-')} rows, "
                    f"{m.get('seconds', '-')} s"
                )
            out.append(
                StageStatus(
                    name, "done", f"{detail}{', ' + job if job else ''}", folder, job_id, log_path
                )
            )
            continue
        st = states.get(job_id) if job_id else None
        if entry and st is not None and st.state in ("RUNNING", "COMPLETING", "CONFIGURING"):
            out.append(StageStatus(name, "running", f"{job}, {shards}", folder, job_id, log_path))
        elif entry and st is not None and st.in_flight:
            why = f" ({st.reason})" if st.reason and st.reason != "None" else ""
            state = "pending" if st.state != "SUSPENDED" else "suspended"
            out.append(
                StageStatus(
                    name, state, f"{job} {st.state}{why}, {shards}", folder, job_id, log_path
                )
            )
        elif entry and st is not None:
            if st.cancelled_by_dependency:
                out.append(
                    StageStatus(
                        name,
                        "cancelled",
                        f"{job} CANCELLED: an input's job failed",
                        folder,
                        job_id,
                        log_path,
                    )
                )
            else:
                detail = f"{job} {st.state}, {shards}; log: {log_path}"
                out.append(
                    StageStatus(
                        name, "failed", detail, folder, job_id, log_path, _error_line(log_path)
                    )
                )
        elif entry:
            where = "Slurm does not know it" if jobs.have_slurm() else "no Slurm here to ask"
            out.append(
                StageStatus(
                    name,
                    "submitted",
                    f"{job} ({where}), {shards}; log: {log_path}",
                    folder,
                    job_id,
                    log_path,
                )
            )
        elif done_shards:
            out.append(StageStatus(name, "partial", shards, folder))
        else:
            out.append(StageStatus(name, "not started", "", folder))
    return out


def print_status(plan: RunPlan) -> None:
    root = plan.run_dir
    lines = [f"run_dir: {root}"]
    for r in stage_status(plan):
        rel = r.folder.relative_to(root) if r.folder.is_relative_to(root) else r.folder
        lines.append(f"{r.stage:<12}{r.state:<12}{r.detail + '  ' if r.detail else ''}[{rel}]")
        if r.note:
            lines.append(f"{'':<24}{r.note}")
    print("\n".join(lines), flush=True)
