"""`plan=true` with a Slurm profile: the jobs `submit_pipeline` would submit, their
resources, dependencies and GPU-hours, read from the launch's `RunPlan`; submits nothing."""

from __future__ import annotations

from cpt.graph import RunPlan, format_work
from cpt.planner import Prediction, device, prediction_lines
from cpt.slurm.jobs import have_slurm
from cpt.slurm.submit import in_flight_job


def plan_jobs(plan: RunPlan, predictions: dict[str, Prediction]) -> str:
    """What `submit_pipeline` would submit: jobs, resources, dependencies, GPU-hours (the
    upper bound from time limits, then the planner's prediction)."""
    cfg = plan.cfg
    c = cfg.cluster
    rows = [("stage", "action", "resources", "afterok", "work")]
    jobs: dict[str, str] = {}  # stage -> "" (new job) or the id of its job in flight
    n_jobs, gpu_hours = 0, 0.0
    for node in plan.selected_nodes():
        name, res = node.name, node.resources
        if node.done and not node.always_run:
            rows.append((name, "done", "-", "-", str(node.folder)))
            continue
        entry, state = in_flight_job(node.folder) if have_slurm() else (None, None)
        if entry and state is not None and state.in_flight and not node.always_run:
            jobs[name], action = state.job_id, f"in flight {state.job_id}"
        else:
            jobs[name], action = "", "submit"
            n_jobs += 1
            gpu_hours += res.gpu_hours
        after = [f"{d}({jobs[d]})" if jobs[d] else d for d in node.needs if d in jobs]
        work = format_work(node.spec.plan(cfg))
        rows.append((name, action, res.describe(), ",".join(after) or "-", work))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(4)]
    lines = [
        f"run_dir: {plan.run_dir}",
        f"cluster: {c.name} (partition {c.partition or '-'}, account {c.account or '-'}, "
        f"qos {c.qos or '-'}); plan only, nothing is submitted",
        *("".join(f"{v:<{w}}" for v, w in zip(r[:4], widths)) + r[4] for r in rows),
        f"jobs to submit: {n_jobs}",
        *prediction_lines(predictions, device(cfg)),
        f"GPU-hours (upper bound, GPUs x time limit of each new job): {gpu_hours:.1f}",
    ]
    return "\n".join(lines)
