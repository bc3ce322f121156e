"""Slurm: the stage graph as dependent jobs, requeue after preemption, Ray on Slurm.

With a non-local `cluster=` profile, `pipeline.run` calls `submit_pipeline`: each selected
stage that is not done becomes one Slurm job (submitit), chained with `afterok`
dependencies on its inputs' jobs, with the resources the stage needs (GPU stages get the
profile's GPUs, CPU-only stages none). Jobs are recorded in a small ledger, `job.json` in
the stage's folder; a stage whose ledger job is still queued or running is not submitted
again: its job id becomes the dependency. Stage folders are content-keyed, so a sweep over
students (many drivers, one run_dir) submits each data stage once and one per-student chain
per student. A run-level lock (`<run_dir>/.slurm/submit.lock`) keeps two drivers from
submitting the same stage at once.

Each job runs `StageJob(cfg, stage)`, a submitit `Checkpointable`: on USR2 (preemption, or
`signal_delay_s` before the time limit) submitit pickles it and requeues the job; the new
run calls `pipeline.run_stage` again, which resumes (finished shards are skipped, training
resumes from its last checkpoint). Models are never pickled, only the config.

Dependents of a failed job are cancelled by Slurm (`--kill-on-invalid-dep=yes`), never left
pending. `wait=true` blocks until the jobs end and fails naming the stage and its log.

`ray_cluster()` starts a Ray cluster inside a (multi-node) allocation: head here, one
worker per other node via `srun`, stopped at exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from cpt import store
from cpt.config import CptConfig

log = logging.getLogger(__name__)

STAGE_JOB_ENV = "CPT_STAGE_JOB"  # set inside a stage job: pipeline.run runs in-process there
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
# Variables of the submitting environment that must not leak into a job submitted from
# inside another job (the hydra `slurm` launcher's drivers): sbatch/srun read some of them
# as input (e.g. SLURM_MEM_PER_CPU vs --mem makes srun fail in the new job).
_JOB_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_")
_NOT_RAY_MULTINODE = frozenset({"train"})  # stages that never span nodes through Ray


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
    store.atomic_write_json(ledger_path(stage_dir), {**entry, "history": history})


@contextlib.contextmanager
def submission_lock(run_dir: Path) -> Iterator[None]:
    """Serialise submissions to one run folder (several sweep drivers at once)."""
    path = Path(run_dir) / SLURM_SUBDIR / "submit.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks while another driver submits
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _clean_submit_env() -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith(_JOB_ENV_PREFIXES)}
    saved_stage = os.environ.pop(STAGE_JOB_ENV, None)
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)
        if saved_stage is not None:
            os.environ[STAGE_JOB_ENV] = saved_stage


# --------------------------------------------------------------------- resources


@dataclass(frozen=True)
class JobResources:
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    time_min: int
    partition: str

    @property
    def gpu_hours(self) -> float:
        """Upper bound: every GPU held for the whole time limit."""
        return self.nodes * self.gpus_per_node * self.time_min / 60

    def describe(self) -> str:
        nodes = f"{self.nodes} nodes, " if self.nodes > 1 else ""
        return (
            f"{nodes}{self.gpus_per_node} GPU, {self.cpus_per_task} CPU, "
            f"{self.mem_gb} GB, {self.time_min} min"
        )


def _specs() -> dict[str, Any]:
    from cpt.pipeline import stage_specs

    return stage_specs()


def stage_resources(cfg: CptConfig, name: str) -> JobResources:
    """GPU stages get the profile's GPUs (and CPUs per GPU); CPU-only stages get none."""
    c = cfg.cluster
    spec = _specs()[name]
    if spec.gpu:
        gpus = c.gpus_per_node
        multi = c.nodes > 1 and name not in _NOT_RAY_MULTINODE and cfg.parallel.backend == "ray"
        return JobResources(
            nodes=c.nodes if multi else 1,
            gpus_per_node=gpus,
            cpus_per_task=c.cpus_per_task * max(1, gpus),
            mem_gb=c.mem_gb,
            time_min=c.time_min,
            partition=c.partition,
        )
    return JobResources(
        nodes=1,
        gpus_per_node=0,
        cpus_per_task=c.cpus_per_task,
        mem_gb=c.cpu_mem_gb or c.mem_gb,
        time_min=c.time_min,
        partition=c.cpu_partition or c.partition,
    )


def executor_parameters(
    cfg: CptConfig, name: str, job_name: str, dependency: list[str]
) -> dict[str, Any]:
    """Keyword arguments of `submitit.SlurmExecutor.update_parameters` for a stage job."""
    c = cfg.cluster
    res = stage_resources(cfg, name)
    extra: dict[str, Any] = {"requeue": True, "kill-on-invalid-dep": "yes"}
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": 1,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{res.mem_gb}GB",
        "signal_delay_s": c.signal_delay_s,
        "stderr_to_stdout": False,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
        if c.constraint:
            params["constraint"] = c.constraint
    for key, value in (("partition", res.partition), ("account", c.account), ("qos", c.qos)):
        if value:
            params[key] = value
    if dependency:
        params["dependency"] = "afterok:" + ":".join(dependency)
    if res.nodes > 1:
        # One process on the first node starts Ray (head here, workers via srun), so python
        # runs in the batch shell rather than in one srun task per node; the signal then has
        # to go to the batch shell ("B:").
        params["use_srun"] = False
        extra["signal"] = f"B:USR2@{c.signal_delay_s}"
    params["additional_parameters"] = {**extra, **dict(c.additional_parameters)}
    return params


# ---------------------------------------------------------------------- the job


class StageJob(submitit.helpers.Checkpointable):
    """Runs one stage in a Slurm job; requeued with its state on USR2 (preemption/time-out).

    Only the config and the stage name are pickled: the stage itself resumes from what is on
    disk (finished shards, training checkpoints), so the re-run reaches the same output.
    """

    def __init__(self, cfg: CptConfig, stage: str) -> None:
        self.cfg = cfg
        self.stage = stage
        self.attempts = 0

    def __call__(self) -> str:
        from cpt import pipeline

        os.environ[STAGE_JOB_ENV] = "1"
        _job_logging()
        self.attempts += 1
        cfg, name = self.cfg, self.stage
        log.info(
            "stage job %s (attempt %d, Slurm restart count %s): stage %s",
            os.environ.get("SLURM_JOB_ID"),
            self.attempts,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
            name,
        )
        spec = pipeline.stage_specs()[name]
        missing = [dep for dep in spec.needs if not store.is_done(pipeline.stage_dir(cfg, dep))]
        if missing and not _always_run(spec):  # (a view like report renders what exists)
            raise SlurmError(
                f"stage {name}: inputs {missing} are not done although this job ran after "
                "their jobs; see their logs (`stage=status`)"
            )
        res = stage_resources(cfg, name)
        cfg = _fit_local_ray(cfg)
        if res.nodes > 1:
            with ray_cluster(num_gpus=res.gpus_per_node) as address:
                cfg = dataclasses.replace(
                    cfg, parallel=dataclasses.replace(cfg.parallel, address=address)
                )
                out = pipeline.run_stage(cfg, name)
        else:
            out = pipeline.run_stage(cfg, name)
        _link_logs_in_manifest(out)
        return str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log.warning(
            "stage %s: signal received; requeueing (finished work is kept on disk)", self.stage
        )
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _fit_local_ray(cfg: CptConfig) -> CptConfig:
    """A local Ray started inside the job uses the job's CPUs, not every CPU of the node
    (`parallel` is performance only: not part of any stage key)."""
    p = cfg.parallel
    cpus = os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_CPUS_PER_TASK")
    if p.backend == "ray" and not p.address and not p.num_cpus and cpus and cpus.isdigit():
        return dataclasses.replace(cfg, parallel=dataclasses.replace(p, num_cpus=int(cpus)))
    return cfg


def _job_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
            stream=sys.stderr,
        )
    logging.getLogger("cpt").setLevel(logging.INFO)


def _link_logs_in_manifest(out: Path) -> None:
    """Add this job's log paths to the stage manifest when this job wrote it."""
    jid = os.environ.get("SLURM_JOB_ID")
    path = Path(out) / store.MANIFEST
    if not jid or not path.exists():
        return
    with contextlib.suppress(store.StoreError, OSError):
        manifest = store.read_json(path)
        if str(manifest.get("slurm_job_id")) != jid:
            return
        ledger = read_ledger(out) or {}
        manifest["slurm"] = {
            "job_id": jid,
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "stdout": ledger.get("stdout"),
            "stderr": ledger.get("stderr"),
            "folder": ledger.get("folder"),
        }
        store.atomic_write_json(path, manifest)


# --------------------------------------------------------------------- submission


@dataclass
class Submitted:
    """A stage's place in one submission: done, reused (in flight) or newly submitted."""

    stage: str
    out_dir: Path
    action: str  # "done" | "reused" | "submitted"
    job_id: str = ""
    after: tuple[str, ...] = ()
    stderr: str = ""


def _absolute(cfg: CptConfig) -> CptConfig:
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).absolute()))


def job_folder(cfg: CptConfig, name: str, out_dir: Path) -> Path:
    return Path(cfg.run_dir).absolute() / SLURM_SUBDIR / f"{name}-{out_dir.name}"


def _in_flight_job(out_dir: Path) -> tuple[dict[str, Any] | None, JobState | None]:
    entry = read_ledger(out_dir)
    if not entry or not entry.get("job_id"):
        return entry, None
    state = job_states([entry["job_id"]]).get(str(entry["job_id"]))
    return entry, state


def submit_pipeline(cfg: CptConfig) -> list[Submitted]:
    """Submit the selected stages that are neither done nor in flight, chained by afterok."""
    from cpt.pipeline import selected_stages, stage_dir

    if not have_slurm():
        raise SlurmError(
            f"cluster={cfg.cluster.name} submits Slurm jobs, but sbatch/squeue are not on PATH "
            "here; run on a login node, or use cluster=local"
        )
    cfg = _absolute(cfg)
    specs = _specs()
    run_dir = Path(cfg.run_dir)
    plan: dict[str, Submitted] = {}
    with submission_lock(run_dir):
        for name in selected_stages(cfg):
            out = stage_dir(cfg, name)
            if _always_run(specs[name]):  # a view of other stages (report): every run renders it
                after = [plan[d].job_id for d in specs[name].needs if d in plan and plan[d].job_id]
                plan[name] = _submit_stage(cfg, name, out, after, singleton=True)
                continue
            if store.is_done(out):
                log.info("stage %s: done already (%s), skipping", name, out)
                plan[name] = Submitted(name, out, "done")
                continue
            entry, state = _in_flight_job(out)
            if store.is_done(out):  # its job finished while we looked
                plan[name] = Submitted(name, out, "done")
                continue
            if entry and state is not None and state.in_flight:
                log.info(
                    "stage %s: job %s is %s already; reusing it", name, state.job_id, state.state
                )
                plan[name] = Submitted(
                    name, out, "reused", state.job_id, stderr=entry.get("stderr", "")
                )
                continue
            after = []
            for dep in specs[name].needs:
                ref = plan.get(dep)
                if ref is None:
                    dep_dir = stage_dir(cfg, dep)
                    if store.is_done(dep_dir):
                        continue
                    raise SlurmError(f"stage {name}: input {dep} is neither done nor selected")
                if ref.action != "done":
                    after.append(ref.job_id)
            plan[name] = _submit_stage(cfg, name, out, after)
    _print_submission(cfg, list(plan.values()))
    subs = list(plan.values())
    if cfg.wait:
        wait_for(cfg, subs)
    return subs


def _always_run(spec: Any) -> bool:
    return bool(getattr(spec, "always_run", False))


def job_name(cfg: CptConfig, name: str, out: Path) -> str:
    """`cpt-<stage>-<folder>`; one folder per run for always-run stages, so the run is named."""
    if _always_run(_specs()[name]):
        return f"cpt-{name}-{store.content_hash(str(Path(cfg.run_dir).absolute()), 12)}"
    return f"cpt-{name}-{out.name}"


def _submit_stage(
    cfg: CptConfig, name: str, out: Path, after: list[str], singleton: bool = False
) -> Submitted:
    folder = job_folder(cfg, name, out)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
    params = executor_parameters(cfg, name, job_name(cfg, name, out), after)
    if singleton:  # one at a time per run folder (they share it); the last sees every input
        params["dependency"] = ",".join(filter(None, [params.get("dependency"), "singleton"]))
    executor.update_parameters(**params)
    with _clean_submit_env():
        try:
            job = executor.submit(StageJob(cfg, name))
        except Exception as exc:  # submitit wraps sbatch's message
            raise SlurmError(f"stage {name}: sbatch failed: {exc}") from exc
    entry = {
        "stage": name,
        "key": out.name,
        "job_id": str(job.job_id),
        "submitted": time.time(),
        "cluster": cfg.cluster.name,
        "folder": str(folder),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "submission_file": str(job.paths.submission_file),
        "after": list(after),
        "host": socket.gethostname(),
        "argv": sys.argv,
    }
    write_ledger(out, entry)
    log.info(
        "stage %s: submitted job %s%s (log %s)",
        name,
        job.job_id,
        f" after {','.join(after)}" if after else "",
        job.paths.stderr,
    )
    return Submitted(name, out, "submitted", str(job.job_id), tuple(after), str(job.paths.stderr))


def _print_submission(cfg: CptConfig, subs: list[Submitted]) -> None:
    lines = [f"run_dir: {cfg.run_dir}  (cluster {cfg.cluster.name})"]
    for s in subs:
        if s.action == "done":
            lines.append(f"  {s.stage:<11}done        {s.out_dir}")
        else:
            after = f" after {','.join(s.after)}" if s.after else ""
            lines.append(f"  {s.stage:<11}{s.action:<12}job {s.job_id}{after}  log {s.stderr}")
    print("\n".join(lines), flush=True)


def wait_for(cfg: CptConfig, subs: list[Submitted], poll_s: float = 3.0) -> None:
    """Block until every job of `subs` has ended; raise SlurmError naming failed stages."""
    todo = {s.stage: s for s in subs if s.action != "done"}
    failed: list[str] = []
    unknown_since: dict[str, float] = {}
    last_report = 0.0
    while todo:
        states = job_states(s.job_id for s in todo.values())
        for name, s in list(todo.items()):
            st = states.get(s.job_id)
            if st is not None and st.in_flight:
                unknown_since.pop(name, None)
                continue
            if (
                st is None
                and not store.is_done(s.out_dir)
                and time.time() - unknown_since.setdefault(name, time.time()) < 120
            ):
                continue  # just submitted (accounting lags) or purged: give it a while
            del todo[name]
            always = _always_run(_specs()[name])  # its folder may be done from an earlier run
            if (st is not None and st.state == "COMPLETED") if always else store.is_done(s.out_dir):
                log.info("stage %s: job %s finished", name, s.job_id)
                continue
            state = st.state if st else "UNKNOWN"
            why = (
                " (an input's job failed)" if st is not None and st.cancelled_by_dependency else ""
            )
            failed.append(f"stage {name}: job {s.job_id} {state}{why}; log: {s.stderr}")
        if todo and time.time() - last_report > 30:
            last_report = time.time()
            log.info(
                "waiting for %s",
                ", ".join(
                    f"{n} ({states[s.job_id].state if s.job_id in states else '?'} {s.job_id})"
                    for n, s in todo.items()
                ),
            )
        if todo:
            time.sleep(poll_s)
    if failed:
        raise SlurmError("Slurm jobs failed:\n  " + "\n  ".join(failed))


# -------------------------------------------------------------------------- plan


def format_work(info: dict[str, Any]) -> str:
    """A stage's StageSpec.plan as text: `rows<=42, shards<=2, filter=False`."""
    return ", ".join(
        f"{k}{v}" if str(k).endswith(("<=", ">=")) else f"{k}={v}" for k, v in info.items()
    )


def plan_jobs(cfg: CptConfig) -> str:
    """What `submit_pipeline` would submit: jobs, resources, dependencies, GPU-hours."""
    from cpt.pipeline import selected_stages, stage_dir

    cfg = _absolute(cfg)
    specs = _specs()
    c = cfg.cluster
    rows = [("stage", "action", "resources", "afterok", "work")]
    jobs: dict[str, str] = {}  # stage -> "" (new job) or the id of its job in flight
    n_jobs, gpu_hours = 0, 0.0
    for name in selected_stages(cfg):
        out = stage_dir(cfg, name)
        res = stage_resources(cfg, name)
        always = _always_run(specs[name])
        if store.is_done(out) and not always:
            rows.append((name, "done", "-", "-", str(out)))
            continue
        entry, state = _in_flight_job(out) if have_slurm() else (None, None)
        if entry and state is not None and state.in_flight and not always:
            jobs[name], action = state.job_id, f"in flight {state.job_id}"
        else:
            jobs[name], action = "", "submit"
            n_jobs += 1
            gpu_hours += res.gpu_hours
        after = [f"{d}({jobs[d]})" if jobs[d] else d for d in specs[name].needs if d in jobs]
        work = format_work(specs[name].plan(cfg))
        rows.append((name, action, res.describe(), ",".join(after) or "-", work))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(4)]
    lines = [
        f"run_dir: {cfg.run_dir}",
        f"cluster: {c.name} (partition {c.partition or '-'}, account {c.account or '-'}, "
        f"qos {c.qos or '-'}); plan only, nothing is submitted",
        *("".join(f"{v:<{w}}" for v, w in zip(r[:4], widths)) + r[4] for r in rows),
        f"jobs to submit: {n_jobs}",
        f"GPU-hours (upper bound, GPUs x time limit of each new job): {gpu_hours:.1f}",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------- Ray on Slurm


def _job_hostnames() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if nodelist:
        from submitit.slurm.slurm import _parse_node_list

        with contextlib.suppress(Exception):
            return _parse_node_list(nodelist)
    return [socket.gethostname()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


def _wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SlurmError(f"ray head exited with {proc.returncode} before {host}:{port} opened")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.5)
    raise SlurmError(f"ray head did not open {host}:{port} in time")


def _alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        ray.shutdown()


def _stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes on TERM
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ray_cluster(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    port: int = 0,
    timeout_s: float = 180.0,
) -> Iterator[str]:
    """A Ray cluster over this job's nodes; yields its address (also exported as RAY_ADDRESS).

    Run it on the allocation's first node (the batch shell or task 0). The head starts here
    with `ray start --head --block`; with more nodes, `srun --nodes=N-1 --ntasks-per-node=1
    ray start --address=... --block` starts one worker per other node. At exit both are
    sent SIGTERM (which makes `ray start --block` stop what it started) rather than running
    `ray stop`, which would also kill other jobs' Ray on a shared node.
    """
    nodes = _job_hostnames()
    n_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", len(nodes)) or 1)
    head = nodes[0]
    ip = "127.0.0.1" if n_nodes == 1 else socket.gethostbyname(head)
    port = port or _free_port()
    address = f"{ip}:{port}"
    if num_cpus is None:
        num_cpus = int(
            os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_CPUS_PER_TASK") or 0
        ) or (os.cpu_count() or 1)
    if num_gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        num_gpus = len([d for d in visible.split(",") if d.strip()]) if visible else 0
    tag = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    temp_dir = f"/tmp/ray-cpt-{tag}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        # the whole cluster goes at once: no point draining a node (up to 30 s) on SIGTERM
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": os.environ.get(
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0"
        ),
    }
    common = [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--disable-usage-stats"]
    head_cmd = [
        _ray_bin(),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={ip}",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        *common,
    ]
    log.info("ray head on %s: %s", head, " ".join(head_cmd))
    head_proc = subprocess.Popen(head_cmd, env=env, start_new_session=True)
    workers: subprocess.Popen | None = None
    saved = os.environ.get("RAY_ADDRESS")
    try:
        deadline = time.time() + timeout_s
        _wait_port(ip, port, deadline, head_proc)
        if n_nodes > 1:
            worker_cmd = [
                "srun",
                f"--nodes={n_nodes - 1}",
                "--ntasks-per-node=1",
                f"--exclude={head}",
                "--overlap",
                _ray_bin(),
                "start",
                f"--address={address}",
                "--block",
                *common,
            ]
            log.info("ray workers: %s", " ".join(worker_cmd))
            workers = subprocess.Popen(worker_cmd, env=env, start_new_session=True)
            while _alive_nodes(address) < n_nodes:
                if workers.poll() is not None:
                    raise SlurmError(f"ray workers (srun) exited with {workers.returncode}")
                if time.time() > deadline:
                    raise SlurmError(f"only some of {n_nodes} nodes joined ray at {address}")
                time.sleep(2)
        os.environ["RAY_ADDRESS"] = address
        log.info("ray cluster up at %s (%d node(s))", address, n_nodes)
        yield address
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        _stop(workers)
        _stop(head_proc)
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        log.info("ray cluster at %s stopped", address)
