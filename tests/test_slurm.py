"""The stage graph on a real Slurm cluster (../shared/slurm-ci: one node, partition debug, no
GPUs, accounting on): the whole pipeline swept over two students through the `slurm` Hydra
launcher (data stages submitted once, one train/evaluate/report chain per student), requeue
by USR2 mid-generation, a failing stage cancelling its dependents, plan=true, Ray in a job.

Slurm work overlaps where it can: the module fixture `sweep` submits the Ray job, starts an
in-process reference run of the data stages and the sweep, then waits for the sweep's jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, has_slurm, launch, pin_tiny

from cpt import slurm, store
from cpt.config import resolve_recipe
from cpt.graph import format_work
from cpt.pipeline import resolve, stage_dir, stage_specs
from cpt.workload import teacher_grid

START_SCRIPT = REPO.parent / "shared" / "slurm-ci" / "start-slurm.sh"


def _slurm_up() -> bool:
    """Slurm answers, or ../shared/slurm-ci can start it (as .ci/run does)."""
    if has_slurm():
        return True
    # start the daemons if Slurm is installed but down; never install packages from a test
    if START_SCRIPT.exists() and os.geteuid() == 0 and shutil.which("slurmctld"):
        subprocess.run(
            ["bash", str(START_SCRIPT)],
            env={**os.environ, "SLURM_CI_CPUS": "4", "SLURM_CI_QUIET": "1"},
            capture_output=True,
            timeout=600,
        )
    return has_slurm()


needs_slurm = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not _slurm_up(),
        reason="no Slurm cluster: `sbatch`/`sinfo -h` do not answer and "
        f"{START_SCRIPT} could not start one (see ../shared/slurm-ci/README.md)",
    ),
]


def slurm_test(fn):
    """Marked `slurm`; skipped, saying why, when no cluster answers."""
    for mark in needs_slurm:
        fn = mark(fn)
    return fn


# Small and quick: 2 tasks x 1 rubric x 3 levels, short generations, the inline runner.
SMALL = [
    "tasks.num_tasks=2",
    "tasks.test_fraction=0.5",
    "rubrics.include=[concision]",
    "generate.no_rubric=false",
    "parallel.backend=inline",
    "teacher.sampling.max_new_tokens=16",
    "judge.sampling.max_new_tokens=32",
    "student.sampling.max_new_tokens=16",
    "adherence.max_attempts=1",
]
FAST = {  # for the stages that exist (stages are added to REGISTRY over time)
    "train": ["train.max_steps=1", "train.save_steps=1", "train.grad_accum=1"],
    "evaluate": [
        "evaluate.samples=1",
        "evaluate.baseline=false",
        "evaluate.judge_max_attempts=1",
        "evaluate.agreement_fraction=0",
    ],
    "report": ["report.n_boot=10"],
}
STUDENTS = ("tiny", "tiny_nosys")


def small(*extra: str) -> list[str]:
    cfg = compose(*SMALL)
    out = list(SMALL)
    for stage, overrides in FAST.items():
        section = getattr(cfg, stage, None)
        if stage in stage_specs() and section is not None:
            out += [o for o in overrides if hasattr(section, o.split("=")[0].split(".")[1])]
    return [*out, *extra]


def data_stages() -> list[str]:
    specs = stage_specs()
    return [n for n, s in specs.items() if not s.per_student and not getattr(s, "always_run", 0)]


def per_student_stages() -> list[str]:
    return [n for n, s in stage_specs().items() if s.per_student]


SACCT_FIELDS = ["JobIDRaw", "JobName", "State", "Reason", "Submit", "Start", "End"]


def sacct(*args: str) -> list[dict[str, str]]:
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", ",".join(SACCT_FIELDS), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [dict(zip(SACCT_FIELDS, ln.split("|"))) for ln in proc.stdout.splitlines() if ln]


def sacct_jobs(job_ids, timeout: float = 30) -> dict[str, dict[str, str]]:
    """Accounting rows of these jobs, once sacct has caught up (it lags squeue by 1-2 s)."""
    ids_ = sorted({str(j) for j in job_ids})
    deadline = time.time() + timeout
    while True:
        rows = {r["JobIDRaw"]: r for r in sacct("-j", ",".join(ids_))}
        settled = all(r["State"].split(" ")[0] not in slurm.IN_FLIGHT for r in rows.values())
        if (len(rows) == len(ids_) and settled) or time.time() > deadline:
            return rows
        time.sleep(1)


def ledger(cfg, stage: str) -> dict:
    entry = slurm.read_ledger(stage_dir(cfg, stage))
    assert entry, f"no job.json for {stage} in {stage_dir(cfg, stage)}"
    return entry


def submissions(cfg, stage: str) -> list[str]:
    """Job ids submitted for this stage folder: submitit leaves one <id>_submission.sh each."""
    folder = slurm.job_folder(Path(cfg.run_dir), stage, stage_dir(cfg, stage))
    return sorted(p.name.split("_")[0] for p in folder.glob("*_submission.sh"))


def wait_until(pred, timeout: float, what: str, step: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def popen_launch(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "launch.py"), *pin_tiny(args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def ids(d: Path) -> list[str]:
    return sorted(store.read_table(d, columns=["id"])["id"].to_pylist())


def queue() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data stages of the same config run in-process (cluster=local), in the background."""
    d = tmp_path_factory.mktemp("reference")
    proc = popen_launch(f"run_dir={d}", f"stage={data_stages()[-1]}", *small())
    yield d, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def reference_dir(reference) -> Path:
    d, proc = reference
    if proc.returncode is None:
        rc, out = finish(proc, 600)
        assert rc == 0, out[-3000:]
    return d


RAY_SCRIPT = """#!/usr/bin/env bash
set -euo pipefail
cd {repo}
export PATH={bin}:$PATH
source slurm/ray_cluster.sh
ray_cluster_start
python -c 'import ray; ray.init(address="auto", log_to_driver=False); \
print("SHELL", len(ray.nodes()), int(ray.cluster_resources()["CPU"]))'
ray_cluster_stop
python - <<'PY'
import os, ray
from cpt.cluster import ray_cluster
with ray_cluster() as address:
    assert os.environ["RAY_ADDRESS"] == address
    ray.init(address=address, log_to_driver=False)
    f = ray.remote(lambda: os.environ.get("SLURM_JOB_ID"))
    print("PY", len(ray.nodes()), ray.get(f.remote()) == os.environ["SLURM_JOB_ID"])
print("PY_STOPPED", ray.is_initialized(), "RAY_ADDRESS" in os.environ)
PY
pgrep -f "ray-cpt-$SLURM_JOB_ID" >/dev/null && echo LEFTOVER || echo CLEAN
"""


@pytest.fixture(scope="module")
def ray_job(tmp_path_factory):
    """A 1-CPU job that starts Ray with slurm/ray_cluster.sh, then with cpt.cluster.ray_cluster
    (head only: one node) and checks nothing is left behind; submitted early, checked last."""
    d = tmp_path_factory.mktemp("ray")
    script = d / "ray.sh"
    script.write_text(RAY_SCRIPT.format(repo=REPO, bin=Path(sys.executable).parent))
    out = d / "ray.out"
    jid = subprocess.run(
        ["sbatch", "--parsable", "-c", "1", "--mem=2G", "-t", "10", "-o", str(out), str(script)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return jid, out


def all_job_ids(run_dir: Path) -> set[str]:
    """Every stage job submitted under run_dir (submitit keeps <id>_submission.sh per job)."""
    folder = run_dir / slurm.SLURM_SUBDIR
    return {p.name.split("_")[0] for p in folder.rglob("*_submission.sh")}


def wait_jobs_end(run_dir: Path, timeout: float) -> dict[str, slurm.JobState]:
    def ended():
        jobs = all_job_ids(run_dir)
        states = slurm.job_states(jobs)
        if jobs and len(states) == len(jobs) and not any(s.in_flight for s in states.values()):
            return states
        return None

    return wait_until(ended, timeout, f"the jobs under {run_dir} to end", step=2)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, reference, ray_job):
    """`python jobs/launch.py -m hydra/launcher=slurm cluster=ci student=tiny,tiny_nosys`: two
    driver jobs (a job array) submit the whole pipeline into one run folder; the second finds
    the first's data-stage jobs in the ledger and depends on them."""
    d = tmp_path_factory.mktemp("sweep")
    t0 = time.time() - 1
    over = [f"run_dir={d}", "cluster=ci", *small()]
    cfg = compose(*over)
    proc = popen_launch("-m", "hydra/launcher=slurm", *over, f"student={','.join(STUDENTS)}")
    last_data = data_stages()[-1]
    last_ledger = stage_dir(cfg, last_data) / slurm.LEDGER
    wait_until(lambda: last_ledger.exists() or proc.poll() is not None, 300, "the submission")
    pending = ""
    if last_ledger.exists():
        jid = slurm.read_ledger(stage_dir(cfg, last_data))["job_id"]
        show = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True)
        pending = show.stdout
    rc, out = finish(proc, 600)
    states = wait_jobs_end(d, 900) if rc == 0 else {}
    return {
        "dir": d,
        "over": over,
        "cfg": cfg,
        "launch": (rc, out),
        "pending": pending,
        "states": states,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
    }


# --------------------------------------------------------------------------------- tests


@slurm_test
def test_data_stages_run_as_a_dependent_job_graph(sweep, reference):
    rc, out = sweep["launch"]
    assert rc == 0, out[-4000:]
    cfg = sweep["cfg"]
    specs = stage_specs()
    stages = data_stages()
    job = {s: ledger(cfg, s)["job_id"] for s in stages}
    # while the last data stage was pending, Slurm held it on afterok of its inputs' jobs
    text = sweep["pending"]
    dep = re.search(r"Dependency=(\S+)", text)
    assert dep, text
    for need in specs[stages[-1]].needs:
        assert f"afterok:{job[need]}" in dep.group(1), (need, dep.group(1))
    assert "Requeue=1" in text
    rows = sacct_jobs(job.values())
    for s in stages:
        entry = ledger(cfg, s)
        needs = [job[n] for n in specs[s].needs]
        assert sorted(entry["after"]) == sorted(needs), (s, entry["after"], needs)
        script = Path(entry["submission_file"]).read_text()
        if needs:
            assert "#SBATCH --dependency=afterok:" + ":".join(entry["after"]) in script
        assert "#SBATCH --kill-on-invalid-dep=yes" in script and "#SBATCH --requeue" in script
        assert "--gpus" not in script  # the ci profile has no GPUs
        r = rows[job[s]]
        assert r["State"] == "COMPLETED", (s, r)
        assert r["JobName"] == f"cpt-{s}-{stage_dir(cfg, s).name}"
        for n in specs[s].needs:  # a job started only after its inputs' jobs ended
            assert r["Start"] >= rows[job[n]]["End"], (s, n, r, rows[job[n]])
        m = store.read_json(stage_dir(cfg, s) / store.MANIFEST)
        assert str(m["slurm_job_id"]) == job[s]
        assert Path(m["slurm"]["stderr"]).is_file()  # the manifest links the job's log
    # the outputs equal the in-process run's
    ref = reference_dir(reference)
    ref_cfg = compose(f"run_dir={ref}", *small())
    for s in stages:
        assert stage_dir(ref_cfg, s).name == stage_dir(cfg, s).name
        assert ids(stage_dir(cfg, s)) == ids(stage_dir(ref_cfg, s)), s


@slurm_test
def test_sweep_over_students_submits_data_stages_once(sweep):
    rc, out = sweep["launch"]
    assert rc == 0, out[-4000:]
    d, cfg = sweep["dir"], sweep["cfg"]
    bad = {j: s.state for j, s in sweep["states"].items() if s.state != "COMPLETED"}
    assert not bad, bad
    names = [r["JobName"] for r in sacct("-S", sweep["since"])]
    for s in data_stages():
        # one job per data stage in sacct: the second driver found it in the ledger
        assert names.count(f"cpt-{s}-{stage_dir(cfg, s).name}") == 1, (s, names)
        assert len(submissions(cfg, s)) == 1 and not ledger(cfg, s)["history"]
    # the driver that came second found the data jobs in flight (or, for a quick one, done)
    driver_logs = "".join(p.read_text() for p in (d / ".hydra").rglob("*_log.*"))
    assert "reusing it" in driver_logs, driver_logs[-3000:]
    assert sum(n.startswith("cpt-driver") for n in names) == len(STUDENTS), names
    per_student = per_student_stages()
    for student in STUDENTS:
        scfg = compose(*sweep["over"], f"student={student}")
        for s in per_student:
            assert store.is_done(stage_dir(scfg, s)), (student, s)
            assert names.count(f"cpt-{s}-{stage_dir(scfg, s).name}") == 1, (student, s, names)
        if per_student:  # the first per-student stage depended on the shared data jobs
            first = per_student[0]
            data_ids = {ledger(cfg, n)["job_id"] for n in stage_specs()[first].needs}
            assert set(ledger(scfg, first)["after"]) == data_ids
    if "report" in stage_specs():
        report_md = (d / "report" / "report.md").read_text()
        for student in STUDENTS:
            assert student in report_md


@slurm_test
def test_requeue_by_usr2_mid_generation_resumes_exactly_once(tmp_path):
    """USR2 to a running generate job (what Slurm sends before a time limit or preemption):
    submitit checkpoints and requeues it; the re-run skips the shards finished before, and
    every row of the grid is there exactly once. The driver waits (wait=true) through the
    requeue. 24 one-row shards, so the signal lands mid-run even on an idle machine (with 6,
    the job could finish between the test's check and the signal: CI saw that once)."""
    over = [
        f"run_dir={tmp_path}",
        "cluster=ci",
        *small("generate.shard_size=1", "generate.samples=4", "teacher.sampling.max_new_tokens=64"),
    ]
    cfg = compose(*over)
    driver = popen_launch(*over, "stage=generate", "wait=true")
    gen = stage_dir(cfg, "generate")
    wait_until(lambda: slurm.ledger_path(gen).exists(), 120, "the generate job's ledger")
    jid = ledger(cfg, "generate")["job_id"]
    wait_until(lambda: len(list((gen / "shards").glob("*.json"))) >= 2, 300, "2 finished shards")
    assert not store.is_done(gen), "generate finished before the signal"
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    log_err = Path(ledger(cfg, "generate")["stderr"])
    wait_until(lambda: "Requeued job" in log_err.read_text(errors="replace"), 60, "the requeue")
    before = {p.name: p.stat().st_mtime_ns for p in (gen / "shards").glob("*.json")}
    rc, out = finish(driver, 600)
    assert rc == 0, out[-4000:]
    assert store.is_done(gen)
    states = [r["State"] for r in sacct_history(jid)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    m = store.read_json(gen / store.MANIFEST)
    # shards that finished while the first run exited count as skipped too
    assert 2 <= len(before) <= m["shards_skipped"] < m["n_shards"], (len(before), m)
    after = {p.name: p.stat().st_mtime_ns for p in (gen / "shards").glob("*.json")}
    assert all(after[k] == v for k, v in before.items())  # finished shards not recomputed
    got = ids(gen)
    tasks = store.read_table(stage_dir(cfg, "tasks")).to_pylist()
    grid = sorted(row["id"] for row in teacher_grid(cfg, tasks))
    assert got == grid and len(set(got)) == len(got) == m["rows"] == 24  # exactly once
    text = log_err.read_text(errors="replace")
    assert "signal received; requeueing" in text and "Slurm restart count 1" in text


def sacct_history(jid: str, timeout: float = 30) -> list[dict[str, str]]:
    """Every run of a job (sacct -D: a requeued job has one row per run)."""
    deadline = time.time() + timeout
    while True:
        rows = sacct("-D", "-j", jid)
        if (rows and rows[-1]["State"] == "COMPLETED") or time.time() > deadline:
            return rows
        time.sleep(1)


@slurm_test
def test_failing_stage_cancels_dependents_and_status_shows_its_log(tmp_path):
    """A teacher path that exists but holds no model passes the login-node checks and fails
    inside the job: its dependents are cancelled (none left pending), wait=true exits non-zero
    naming the stage and its log, and stage=status shows the same."""
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    over = [f"run_dir={tmp_path / 'run'}", "cluster=ci", *small(f"teacher.path={bad}")]
    cfg = compose(*over)
    proc = launch(*over, "stage=adherence", "wait=true", check=False, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    gen = ledger(cfg, "generate")
    assert f"stage generate: job {gen['job_id']} FAILED; log: {gen['stderr']}" in err, err[-3000:]
    assert "Traceback" in Path(gen["stderr"]).read_text()
    adh = ledger(cfg, "adherence")
    assert f"stage adherence: job {adh['job_id']} CANCELLED (an input's job failed)" in err
    rows = sacct_jobs([gen["job_id"], adh["job_id"]])
    assert rows[gen["job_id"]]["State"] == "FAILED"
    assert rows[adh["job_id"]]["State"].startswith("CANCELLED")
    assert rows[adh["job_id"]]["Start"] == "None"  # never ran
    mine = {ledger(cfg, s)["job_id"] for s in ("tasks", "generate", "adherence")}
    assert not mine & queue()  # no zombie pending job
    status = launch(*over, "stage=status").stdout
    lines = {ln.split()[0]: ln for ln in status.splitlines() if ln and not ln.startswith(" ")}
    assert lines["tasks"].split()[1] == "done"
    assert lines["generate"].split()[1] == "failed" and "FAILED" in lines["generate"]
    assert f"log: {gen['stderr']}" in lines["generate"]
    assert "Error" in status.split(lines["generate"])[1].splitlines()[1]  # the error line
    assert lines["adherence"].split()[1] == "cancelled"
    for s in ("pairs", *per_student_stages()):
        assert "not started" in lines[s], lines[s]


@slurm_test
def test_plan_prints_jobs_and_gpu_hours_and_submits_nothing(tmp_path):
    before = queue()
    over = [f"run_dir={tmp_path}", "plan=true", "train=auto", *small()]
    out = launch(*over, "cluster=ci").stdout
    assert not (tmp_path / slurm.SLURM_SUBDIR).exists()
    specs = stage_specs()
    for s, spec in specs.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{s} "))
        assert "submit" in line and "0 GPU, 1 CPU, 2 GB, 60 min" in line, line
        after = line.split()[line.split().index("min") + 1]  # the afterok column
        assert after == (",".join(spec.needs) or "-"), line
        planned = resolve_recipe(compose(*over, "cluster=ci"))[0]  # train=auto as the launch
        assert line.endswith(format_work(spec.plan(planned))), line  # shards etc.
    assert "training recipe: cpu (train=auto: cluster profile 'ci' gives 0 GPU(s) per job)" in out
    assert f"jobs to submit: {len(specs)}" in out
    assert "GPU-hours (upper bound, GPUs x time limit of each new job): 0.0" in out
    gpu = launch(*over, "cluster=example_h100").stdout  # a GPU site profile, planned only
    rows = {ln.split()[0]: ln for ln in gpu.splitlines() if " submit " in ln}
    # the tiny models need no GPU; training asks for train.gpus (1) for the profile's 24 h
    assert "1 GPU, 12 CPU, 200 GB, 1440 min" in rows["train"]
    assert all(" 0 GPU, 12 CPU" in ln for s, ln in rows.items() if s != "train"), gpu
    assert "GPU-hours (upper bound, GPUs x time limit of each new job): 24.0" in gpu
    assert queue() <= before  # nothing submitted


@slurm_test
def test_ray_cluster_starts_and_stops_inside_a_slurm_job(ray_job):
    """Head-only Ray (one node) from slurm/ray_cluster.sh and from cpt.cluster.ray_cluster."""
    jid, out = ray_job

    def ended():
        st = slurm.job_states([jid]).get(jid)
        return st if st is not None and not st.in_flight else None

    state = wait_until(ended, 300, "the ray job")
    text = out.read_text()
    assert state.state == "COMPLETED", text[-3000:]
    assert "SHELL 1 1" in text and "PY 1 True" in text, text[-3000:]
    assert "PY_STOPPED False False" in text and "CLEAN" in text, text[-3000:]


# ------------------------------------------------- without a cluster (not marked: run anywhere)


@pytest.mark.parametrize("nodes", [1, 2])
def test_stage_job_resources_and_sbatch_flags(tmp_path, nodes):
    """Each job asks for what its stage runs (TP-2 32B teacher/judge, 4B student): GPUs and
    CPUs per GPU, the stage's time limit; every job can be requeued and is cancelled when an
    input fails; multi-node data stages run python in the batch shell, training one srun
    task per rank."""
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = compose(
        f"run_dir={tmp_path}",
        "cluster=example_h100",
        f"cluster.nodes={nodes}",
        "engine=vllm",
        "teacher=qwen3_32b",
        "judge=qwen3_32b",
        "student=qwen3_4b",
        "train.gpus=4",
    )
    specs = stage_specs()
    plan = resolve(cfg)
    for name, spec in specs.items():
        res = plan[name].resources
        params = slurm.executor_parameters(cfg, res, f"cpt-{name}", ["11", "12"])
        text = _make_sbatch_string(command="python -m x", folder=tmp_path, **params)
        assert "#SBATCH --dependency=afterok:11:12" in text
        assert "#SBATCH --requeue" in text and "#SBATCH --kill-on-invalid-dep=yes" in text
        assert "#SBATCH --account=my_project" in text and "#SBATCH --qos=normal" in text
        minutes = cfg.cluster.stage_time_min.get(name, 1440)
        assert f"#SBATCH --time={minutes}" in text and "#SBATCH --mem=200GB" in text
        if res.gpus_per_node:
            per_task = res.gpus_per_node // res.tasks_per_node
            assert f"#SBATCH --gpus-per-node={res.gpus_per_node}" in text
            assert f"#SBATCH --cpus-per-task={12 * per_task}" in text
            assert "#SBATCH --constraint=h100" in text
        else:
            assert not spec.gpu and "--gpus" not in text and "--constraint" not in text
            assert "#SBATCH --cpus-per-task=12" in text
        multi = res.nodes > 1 and name != "train"
        assert f"#SBATCH --nodes={res.nodes}" in text
        assert f"#SBATCH --ntasks-per-node={4 if name == 'train' else 1}" in text
        if multi:  # no srun: python (Ray head) in the batch shell, which gets the signal
            assert "#SBATCH --signal=B:USR2@300" in text and "\nsrun " not in text
        else:
            assert "#SBATCH --signal=USR2@300" in text and "srun --unbuffered" in text
    # training: one task (rank) per GPU; the judge (5 shards x TP 2) spreads over the nodes
    train = plan["train"].resources
    assert (train.nodes, train.gpus_per_node, train.tasks_per_node, train.ranks) == (1, 4, 4, True)
    assert plan["evaluate"].resources.nodes == nodes
    sysprompts = plan["sysprompts"].resources  # one shard: one replica, one hour
    assert (sysprompts.gpus_per_node, sysprompts.time_min) == (2, 60)
    local = compose(f"run_dir={tmp_path}", "cluster=ci")
    params = slurm.executor_parameters(local, resolve(local)["tasks"].resources, "cpt-tasks", [])
    assert "dependency" not in params and "account" not in params  # unset: site default


def test_ledger_keeps_earlier_jobs(tmp_path):
    slurm.write_ledger(tmp_path, {"job_id": "1", "stage": "generate"})
    slurm.write_ledger(tmp_path, {"job_id": "2", "stage": "generate"})
    entry = slurm.read_ledger(tmp_path)
    assert entry["job_id"] == "2" and [h["job_id"] for h in entry["history"]] == ["1"]


def test_status_without_slurm(tmp_path, monkeypatch, capsys):
    """Without Slurm, status shows what is on disk: done / partial (k shards) / submitted /
    not started."""
    import pyarrow as pa

    from cpt.commands.status import print_status
    from cpt.slurm import jobs

    monkeypatch.setattr(jobs, "have_slurm", lambda: False)
    cfg = compose(f"run_dir={tmp_path}", *SMALL, "generate.shard_size=1")
    tasks = stage_dir(cfg, "tasks")
    store.write_shard(tasks, 0, pa.table({"id": ["a", "b"]}), {})
    store.mark_done(tasks, {"key": "k", "n_shards": 1, "rows": 2, "seconds": 0.1})
    gen = stage_dir(cfg, "generate")
    store.write_shard(gen, 0, pa.table({"id": ["x"]}), {})
    store.write_shard(gen, 1, pa.table({"id": ["y"]}), {})
    slurm.write_ledger(stage_dir(cfg, "sysprompts"), {"job_id": "7", "stderr": "/x/7_0_log.err"})
    print_status(resolve(cfg))
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["tasks"].split()[1] == "done" and "2 rows" in lines["tasks"]
    total = stage_specs()["generate"].plan(cfg)["shards<="]
    assert lines["generate"].split()[1] == "partial" and f"2/{total} shards" in lines["generate"]
    assert (
        "submitted" in lines["sysprompts"] and "job 7 (no Slurm here to ask)" in lines["sysprompts"]
    )
    assert "/x/7_0_log.err" in lines["sysprompts"]
    assert "not started" in lines["pairs"]
