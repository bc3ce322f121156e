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
from dataclasses import dataclass
from pathlib import Path

from cpt import store
from cpt.config import CptConfig


@dataclass
class StageStatus:
    stage: str
    state: str  # done | running | pending | failed | cancelled | partial | not started
    detail: str
    folder: Path
    job_id: str = ""
    log: str = ""


def _shards_total(cfg: CptConfig, name: str) -> int | None:
    from cpt.pipeline import stage_specs

    with contextlib.suppress(Exception):
        for key, value in stage_specs()[name].plan(cfg).items():
            if str(key).startswith("shards") and isinstance(value, int):
                return value
    return None


def _shards_done(folder: Path) -> int:
    return len(list((folder / "shards").glob(f"{store.SHARD_PREFIX}*.json")))


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("srun: ")]
        return lines[-1][:200] if lines else ""
    return ""


def stage_status(cfg: CptConfig) -> list[StageStatus]:
    from cpt import slurm
    from cpt.pipeline import pipeline_order, stage_dir

    rows: list[tuple[str, Path, dict | None]] = []
    for name in pipeline_order():
        folder = stage_dir(cfg, name)
        rows.append((name, folder, slurm.read_ledger(folder)))
    states = slurm.job_states(e["job_id"] for _, _, e in rows if e and e.get("job_id"))
    out = []
    for name, folder, entry in rows:
        job_id = str(entry.get("job_id", "")) if entry else ""
        log_path = entry.get("stderr", "") if entry else ""
        job = f"job {job_id}" if job_id else ""
        total = _shards_total(cfg, name)
        done_shards = _shards_done(folder)
        shards = f"{done_shards}/{total if total is not None else '?'} shards"
        if store.is_done(folder):
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
            if st.state == "CANCELLED" and "Dependency" in st.reason:
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
                last = _last_line(log_path)
                detail = f"{job} {st.state}, {shards}; log: {log_path}"
                if last:
                    detail += f"\n{'':<14}{last}"
                out.append(StageStatus(name, "failed", detail, folder, job_id, log_path))
        elif entry:
            where = "Slurm does not know it" if slurm.have_slurm() else "no Slurm here to ask"
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


def print_status(cfg: CptConfig) -> None:
    rows = stage_status(cfg)
    root = Path(cfg.run_dir).absolute()
    lines = [f"run_dir: {root}"]
    for r in rows:
        rel = r.folder.relative_to(root) if r.folder.is_relative_to(root) else r.folder
        lines.append(
            f"{r.stage:<12}{r.state:<12}{r.detail}  [{rel}]"
            if r.detail
            else f"{r.stage:<12}{r.state:<12}[{rel}]"
        )
    print("\n".join(lines), flush=True)
