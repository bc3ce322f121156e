"""Slurm: the resolved stage graph as dependent jobs.

- `cpt.slurm.jobs`: what Slurm says about a job (squeue/sacct) and the per-stage ledger.
- `cpt.slurm.submit`: submission (`submit_pipeline`, handed the plan and `run_stage`),
  the requeueable `StageJob`, and `wait_for`.
- `cpt.slurm.plan`: `plan=true` with a Slurm profile (jobs, resources, GPU-hours).
Ray on Slurm and the torch.distributed environment live in `cpt.cluster`.
"""

from cpt.slurm.jobs import (
    IN_FLIGHT,
    LEDGER,
    SLURM_SUBDIR,
    JobState,
    SlurmError,
    have_slurm,
    job_states,
    ledger_path,
    read_ledger,
    write_ledger,
)
from cpt.slurm.plan import plan_jobs
from cpt.slurm.submit import (
    STAGE_JOB_ENV,
    StageJob,
    Submitted,
    executor_parameters,
    job_folder,
    job_name,
    submit_pipeline,
    wait_for,
)

__all__ = [
    "IN_FLIGHT",
    "LEDGER",
    "SLURM_SUBDIR",
    "STAGE_JOB_ENV",
    "JobState",
    "SlurmError",
    "StageJob",
    "Submitted",
    "executor_parameters",
    "have_slurm",
    "job_folder",
    "job_name",
    "job_states",
    "ledger_path",
    "plan_jobs",
    "read_ledger",
    "submit_pipeline",
    "wait_for",
    "write_ledger",
]
