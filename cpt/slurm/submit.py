"""Slurm submission: the resolved stage graph as dependent jobs, requeued after preemption.

With a non-local `cluster=` profile, `pipeline.run` hands `submit_pipeline` the launch's
`RunPlan` and a `run_stage(cfg, name)` callable (this module never imports the
pipeline). Each selected stage that is not done becomes one Slurm job (submitit), chained
with `afterok` dependencies on its inputs' jobs, with the resources of its plan node (GPU
stages get the profile's GPUs, CPU-only stages none). Jobs are recorded in the stage's
ledger (`cpt.slurm.jobs`); a stage whose ledger job is still queued or running is not
submitted again: its job id becomes the dependency. Stage folders are content-keyed, so a
sweep over students (many drivers, one run_dir) submits each data stage once and one
per-student chain per student. A run-level lock (`<run_dir>/.slurm/submit.lock`) keeps two
drivers from submitting the same stage at once.

Each job runs `StageJob`, a submitit `Checkpointable`: on USR2 (preemption, or
`signal_delay_s` before the time limit) submitit pickles it and requeues the job; the new
run calls `run_stage` again, which resumes (finished shards are skipped, finished parts of
a shard are kept, training resumes from its last checkpoint). Sites that preempt with
SIGTERM only get the same: a SIGTERM while the job is RUNNING saves and requeues it (a
SIGTERM from `scancel`, job COMPLETING, just ends it). With no signal at all, what is lost
is bounded by the part-files and `cluster.checkpoint_every_min`. Models are never
pickled, only the config.

Dependents of a failed job are cancelled by Slurm (`--kill-on-invalid-dep=yes`), never left
pending. `wait=true` blocks until the jobs end and fails naming the stage and its log; it
is refused inside a Slurm allocation, where the waiting driver would hold resources its own
stage jobs may need (a deadlock on a small partition).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from cpt import store
from cpt.cluster import distributed_env_from_slurm, ray_cluster
from cpt.config import CptConfig
from cpt.graph import JobResources, RunPlan
from cpt.slurm.jobs import (
    SLURM_SUBDIR,
    JobState,
    SlurmError,
    have_slurm,
    job_states,
    read_ledger,
    submission_lock,
    write_ledger,
)

log = logging.getLogger(__name__)

STAGE_JOB_ENV = "CPT_STAGE_JOB"  # set inside a stage job: pipeline.run runs in-process there
# Variables of the submitting environment that must not leak into a job submitted from
# inside another job (the hydra `slurm` launcher's drivers): sbatch/srun read some of them
# as input (e.g. SLURM_MEM_PER_CPU vs --mem makes srun fail in the new job).
_JOB_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SUBMITIT_")

RunStage = Callable[[CptConfig, str], Path]


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


def executor_parameters(
    cfg: CptConfig, res: JobResources, job_name: str, dependency: list[str]
) -> dict[str, Any]:
    """Keyword arguments of `submitit.SlurmExecutor.update_parameters` for a stage job."""
    c = cfg.cluster
    extra: dict[str, Any] = {"requeue": True, "kill-on-invalid-dep": "yes"}
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,  # training: one rank per GPU
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
    if res.nodes > 1 and not res.ranks:
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

    Only the config, the stage name, its resources and the `run_stage` function (pickled by
    reference) travel: the stage itself resumes from what is on disk (finished shards,
    training checkpoints), so the re-run reaches the same output.
    """

    def __init__(
        self, cfg: CptConfig, stage: str, resources: JobResources, run_stage: RunStage
    ) -> None:
        self.cfg = cfg
        self.stage = stage
        self.resources = resources
        self.run_stage = run_stage
        self.attempts = 0

    def __call__(self) -> str:
        os.environ[STAGE_JOB_ENV] = "1"
        _job_logging()
        requeue_on_sigterm()
        self.attempts += 1
        log.info(
            "stage job %s (attempt %d, Slurm restart count %s): stage %s",
            os.environ.get("SLURM_JOB_ID"),
            self.attempts,
            os.environ.get("SLURM_RESTART_COUNT", "0"),
            self.stage,
        )
        cfg = _fit_local_ray(self.cfg)
        res = self.resources
        if res.world_size > 1:
            # one task per rank (srun): RANK, WORLD_SIZE, MASTER_ADDR... for torch.distributed;
            # every rank runs the stage, rank 0 alone writes its outputs and marks it done
            env = distributed_env_from_slurm()
            log.info("rank %s of %s", env.get("RANK"), env.get("WORLD_SIZE"))
            out = self.run_stage(cfg, self.stage)
        elif res.nodes > 1:
            with ray_cluster(num_gpus=self.resources.gpus_per_node) as address:
                cfg = dataclasses.replace(
                    cfg, parallel=dataclasses.replace(cfg.parallel, address=address)
                )
                out = self.run_stage(cfg, self.stage)
        else:
            out = self.run_stage(cfg, self.stage)
        if os.environ.get("RANK", "0") == "0":
            _link_logs_in_manifest(out)
        return str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log.warning(
            "stage %s: signal received; requeueing (finished work is kept on disk)", self.stage
        )
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def requeue_on_sigterm() -> None:
    """Make SIGTERM act as the USR2 submitit set up (save, requeue, exit) while the job is
    RUNNING: some sites preempt with SIGTERM (then SIGKILL) and never send USR2. During a
    `scancel` the job is COMPLETING already: then it just ends, as cancelled.

    The requeue itself (`scontrol requeue`, inside the USR2 handler) ends the running job
    with SIGTERM: that one is ignored, as submitit's own SIGTERM handler does, so the
    handler finishes (logs "Requeued job", exits). Acting on it would re-enter the handler
    or exit halfway through it."""
    usr = signal.getsignal(signal.SIGUSR2)
    if not callable(usr):  # not inside a submitit job
        return
    requeueing = False

    def on_usr(signum: int, frame: Any) -> None:
        nonlocal requeueing
        requeueing = True
        usr(signum, frame)

    def on_term(signum: int, frame: Any) -> None:
        if requeueing:
            log.warning("SIGTERM during the requeue: ignored (the requeue handler exits)")
            return
        state = _own_state()
        if state != "RUNNING":
            log.warning("SIGTERM with the job %s: cancelled, not requeued", state or "gone")
            raise SystemExit(143)
        log.warning("SIGTERM while RUNNING: preempted; saving and requeueing as for USR2")
        on_usr(signum, frame)

    signal.signal(signal.SIGUSR2, on_usr)
    signal.signal(signal.SIGTERM, on_term)


def _own_state() -> str:
    job = os.environ.get("SLURM_JOB_ID", "")
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


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
    always_run: bool = False


def absolute(cfg: CptConfig) -> CptConfig:
    """The config with an absolute run_dir (jobs start in another working directory)."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir).absolute()))


def job_folder(run_dir: Path, name: str, out_dir: Path) -> Path:
    """Where submitit keeps a stage job's pickles and logs."""
    return Path(run_dir).absolute() / SLURM_SUBDIR / f"{name}-{out_dir.name}"


def in_flight_job(out_dir: Path) -> tuple[dict[str, Any] | None, JobState | None]:
    """The stage's ledger entry and what Slurm says about its job (None: no job known)."""
    entry = read_ledger(out_dir)
    if not entry or not entry.get("job_id"):
        return entry, None
    state = job_states([entry["job_id"]]).get(str(entry["job_id"]))
    return entry, state


def job_name(plan: RunPlan, name: str) -> str:
    """`cpt-<stage>-<folder>`; one folder per run for always-run stages, so the run is named."""
    if plan[name].always_run:
        return f"cpt-{name}-{store.content_hash(str(plan.run_dir), 12)}"
    return f"cpt-{name}-{plan[name].folder.name}"


def submit_pipeline(plan: RunPlan, run_stage: RunStage) -> list[Submitted]:
    """Submit the selected stages that are neither done nor in flight, chained by afterok."""
    allocation = os.environ.get("SLURM_JOB_ID")
    if plan.cfg.wait and allocation:
        raise SlurmError(
            f"wait=true inside Slurm job {allocation}: this driver would hold its allocation "
            "while the stage jobs it submits wait for resources (a deadlock on a small "
            "partition); drop wait=true (the jobs are chained with afterok; follow them with "
            "stage=status), or launch the driver from a login node"
        )
    if not have_slurm():
        raise SlurmError(
            f"cluster={plan.cfg.cluster.name} submits Slurm jobs, but sbatch/squeue are not on "
            "PATH here; run on a login node, or use cluster=local"
        )
    cfg = absolute(plan.cfg)
    subs: dict[str, Submitted] = {}
    with submission_lock(plan.run_dir):
        for node in plan.selected_nodes():
            name, out = node.name, node.folder
            if node.always_run:  # a view of other stages (report): every run renders it
                after = [subs[d].job_id for d in node.needs if d in subs and subs[d].job_id]
                subs[name] = _submit_stage(cfg, plan, name, after, run_stage, singleton=True)
                continue
            if node.done:
                log.info("stage %s: done already (%s), skipping", name, out)
                subs[name] = Submitted(name, out, "done")
                continue
            entry, state = in_flight_job(out)
            if entry and state is not None and state.in_flight:
                log.info(
                    "stage %s: job %s is %s already; reusing it", name, state.job_id, state.state
                )
                subs[name] = Submitted(
                    name, out, "reused", state.job_id, stderr=entry.get("stderr", "")
                )
                continue
            if state is not None and store.is_done(out):  # its job finished while we looked
                subs[name] = Submitted(name, out, "done")
                continue
            after = []
            for dep in node.needs:
                ref = subs.get(dep)
                if ref is None:
                    if plan[dep].done:
                        continue
                    raise SlurmError(f"stage {name}: input {dep} is neither done nor selected")
                if ref.action != "done":
                    after.append(ref.job_id)
            subs[name] = _submit_stage(cfg, plan, name, after, run_stage)
    _print_submission(cfg, list(subs.values()))
    out_subs = list(subs.values())
    if cfg.wait:
        wait_for(cfg, out_subs)
    return out_subs


def _submit_stage(
    cfg: CptConfig,
    plan: RunPlan,
    name: str,
    after: list[str],
    run_stage: RunStage,
    singleton: bool = False,
) -> Submitted:
    node = plan[name]
    out = node.folder
    folder = job_folder(plan.run_dir, name, out)
    folder.mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.cluster.max_requeue)
    params = executor_parameters(cfg, node.resources, job_name(plan, name), after)
    if singleton:  # one at a time per run folder (they share it); the last sees every input
        params["dependency"] = ",".join(filter(None, [params.get("dependency"), "singleton"]))
    executor.update_parameters(**params)
    with _clean_submit_env():
        try:
            job = executor.submit(StageJob(cfg, name, node.resources, run_stage))
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
    return Submitted(
        name,
        out,
        "submitted",
        str(job.job_id),
        tuple(after),
        str(job.paths.stderr),
        always_run=node.always_run,
    )


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
            always = s.always_run  # its folder may be done from an earlier run
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
