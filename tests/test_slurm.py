"""The stage graph on a real Slurm cluster (../shared/slurm-ci: one node, partition debug, no
GPUs, accounting on): dependent jobs, a sweep over students sharing the data jobs, requeue by
USR2 mid-generation, a failing stage cancelling its dependents, plan=true, Ray in a job.

Timeline (the Slurm work overlaps; ~4-5 min on 2 cores): the module fixture `graph` submits
the data stages (driver 1, wait=true) and, while they are in flight, a two-student sweep
through the `slurm` Hydra launcher into the same run folder; an in-process run of the same
config runs beside it as the reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, has_slurm, launch

from cpt import slurm, store
from cpt.pipeline import stage_dir, stage_specs

START_SCRIPT = REPO.parent / "shared" / "slurm-ci" / "start-slurm.sh"


def _slurm_up() -> bool:
    if has_slurm():
        return True
    if START_SCRIPT.exists() and os.geteuid() == 0:
        subprocess.run(
            ["bash", str(START_SCRIPT)],
            env={**os.environ, "SLURM_CI_CPUS": "4", "SLURM_CI_QUIET": "1"},
            capture_output=True,
            timeout=600,
        )
    return has_slurm()


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not _slurm_up(),
        reason="no Slurm cluster: `sbatch`/`sinfo -h` do not answer and "
        f"{START_SCRIPT} could not start one (see ../shared/slurm-ci/README.md)",
    ),
]

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
FAST_TRAIN = {  # appended when the stages exist (other stages are added to REGISTRY over time)
    "train": ["train.max_steps=2", "train.save_steps=1", "train.grad_accum=1"],
    "evaluate": [
        "evaluate.samples=1",
        "evaluate.judge_max_attempts=1",
        "evaluate.agreement_fraction=0",
    ],
    "report": ["report.n_boot=10"],
}
STUDENTS = ("tiny", "tiny_nosys")


def small(*extra: str) -> list[str]:
    cfg = compose(*SMALL)
    out = list(SMALL)
    for stage, overrides in FAST_TRAIN.items():
        if stage in stage_specs() and hasattr(cfg, stage):
            section = getattr(cfg, stage)
            out += [o for o in overrides if hasattr(section, o.split("=")[0].split(".")[1])]
    return [*out, *extra]


def data_stages() -> list[str]:
    return [
        n
        for n, s in stage_specs().items()
        if not s.per_student and not getattr(s, "always_run", False)
    ]


def per_student_stages() -> list[str]:
    return [n for n, s in stage_specs().items() if s.per_student]


def sacct(*args: str) -> list[dict[str, str]]:
    fields = ["JobIDRaw", "JobName", "State", "Reason", "Submit", "Start", "End"]
    proc = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", ",".join(fields), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines() if line]


def sacct_jobs(job_ids, timeout: float = 30) -> dict[str, dict[str, str]]:
    """Accounting rows of these jobs, once sacct has caught up (it lags squeue by 1-2 s)."""
    ids = sorted({str(j) for j in job_ids})
    deadline = time.time() + timeout
    while True:
        rows = {r["JobIDRaw"]: r for r in sacct("-j", ",".join(ids))}
        settled = all(
            r.get("State", "").split(" ")[0] not in slurm.IN_FLIGHT for r in rows.values()
        )
        if (len(rows) == len(ids) and settled) or time.time() > deadline:
            return rows
        time.sleep(1)


def ledger(cfg, stage: str) -> dict:
    entry = slurm.read_ledger(stage_dir(cfg, stage))
    assert entry, f"no job.json for {stage} in {stage_dir(cfg, stage)}"
    return entry


def submissions(cfg, stage: str) -> list[str]:
    """Job ids submitted for this stage folder: submitit leaves one <id>_submission.sh each."""
    folder = slurm.job_folder(cfg, stage, stage_dir(cfg, stage))
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
        [sys.executable, str(REPO / "jobs" / "launch.py"), *args],
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


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same data stages run in-process (cluster=local), started in the background."""
    d = tmp_path_factory.mktemp("reference")
    proc = popen_launch(f"run_dir={d}", "stage=pairs", *small())
    yield d, proc
    if proc.poll() is None:
        proc.kill()


def reference_dir(reference) -> Path:
    d, proc = reference
    if proc.returncode is None:
        rc, out = finish(proc, 600)
        assert rc == 0, out[-3000:]
    return d


@pytest.fixture(scope="module")
def graph(tmp_path_factory, reference):
    """Driver 1 submits the data stages (wait=true); while they are in flight a two-student
    sweep runs through the `slurm` Hydra launcher (driver jobs) into the same run folder."""
    d = tmp_path_factory.mktemp("graph")
    t0 = time.time() - 1
    over = [f"run_dir={d}", "cluster=ci", *small()]
    cfg = compose(*over)
    last_data = data_stages()[-1]
    driver = popen_launch(*over, f"stage={last_data}", "wait=true")
    last_ledger = stage_dir(cfg, last_data) / slurm.LEDGER
    wait_until(lambda: last_ledger.exists() or driver.poll() is not None, 120, "submission")
    pending = {}
    last_id = slurm.read_ledger(stage_dir(cfg, last_data))["job_id"]
    proc = subprocess.run(["scontrol", "show", "job", last_id], capture_output=True, text=True)
    pending["scontrol"] = proc.stdout
    sweep = popen_launch(
        "-m",
        "hydra/launcher=slurm",
        *over,
        f"student={','.join(STUDENTS)}",
        "wait=true",
    )
    rc1, out1 = finish(driver, 900)
    rc2, out2 = finish(sweep, 900)
    t1 = time.time()
    return {
        "dir": d,
        "over": over,
        "cfg": cfg,
        "driver": (rc1, out1),
        "sweep": (rc2, out2),
        "pending": pending,
        "seconds": t1 - t0,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
    }


# --------------------------------------------------------------------------------- tests


def test_data_stages_run_as_a_dependent_job_graph(graph, reference):
    rc, out = graph["driver"]
    assert rc == 0, out[-4000:]
    cfg = graph["cfg"]
    specs = stage_specs()
    stages = data_stages()
    job = {s: ledger(cfg, s)["job_id"] for s in stages}
    # while the last data stage was pending, Slurm held it on afterok of its inputs' jobs
    text = graph["pending"]["scontrol"]
    dep = re.search(r"Dependency=(\S+)", text)
    assert dep, text
    for need in specs[stages[-1]].needs:
        assert f"afterok:{job[need]}" in dep.group(1), (need, dep.group(1))
    assert "JobName=cpt-" in text and "Requeue=1" in text
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
    # one job per stage, and the outputs equal the in-process run's
    ref = reference_dir(reference)
    ref_cfg = compose(f"run_dir={ref}", *small())
    for s in stages:
        assert stage_dir(ref_cfg, s).name == stage_dir(cfg, s).name
        assert ids(stage_dir(cfg, s)) == ids(stage_dir(ref_cfg, s)), s


def test_sweep_over_students_reuses_the_data_jobs(graph):
    rc, out = graph["sweep"]
    assert rc == 0, out[-4000:]
    d, cfg = graph["dir"], graph["cfg"]
    for s in data_stages():
        # one submission per data stage: the sweep's drivers found driver 1's jobs in flight
        # (or done) and depended on them
        subs = submissions(cfg, s)
        assert len(subs) == 1, (s, subs)
        names = [
            r
            for r in sacct("-S", graph["since"])
            if r["JobName"] == f"cpt-{s}-{stage_dir(cfg, s).name}"
        ]
        assert len(names) == 1, (s, names)
        assert not ledger(cfg, s)["history"]
    logs = "".join(p.read_text() for p in (d / ".hydra").rglob("*_log.err"))
    assert "reusing it" in logs or "done already" in logs
    per_student = per_student_stages()
    for student in STUDENTS:
        scfg = compose(*graph["over"], f"student={student}")
        for s in per_student:
            folder = stage_dir(scfg, s)
            assert store.is_done(folder), (student, s)
            subs = submissions(scfg, s)
            assert len(subs) == 1, (student, s, subs)
            assert sacct_jobs(subs)[subs[0]]["State"] == "COMPLETED"
        if per_student:  # the first per-student stage waited for the shared data jobs
            first = per_student[0]
            needs = stage_specs()[first].needs
            data_ids = {ledger(cfg, n)["job_id"] for n in needs}
            assert set(ledger(scfg, first)["after"]) <= data_ids
    if "report" in stage_specs():
        report_md = (d / "report" / "report.md").read_text()
        for student in STUDENTS:
            assert student in report_md


def test_requeue_by_usr2_mid_generation_resumes_exactly_once(tmp_path, reference):
    """USR2 to a running generate job: submitit checkpoints and requeues it; the re-run skips
    the shards finished before and the rows equal an uninterrupted run's."""
    over = [
        f"run_dir={tmp_path}",
        "cluster=ci",
        *small("generate.shard_size=1", "teacher.sampling.max_new_tokens=200"),
    ]
    cfg = compose(*over)
    launch(*over, "stage=generate")  # wait=false: returns once the jobs are queued
    gen = stage_dir(cfg, "generate")
    jid = ledger(cfg, "generate")["job_id"]
    wait_until(lambda: len(list((gen / "shards").glob("*.json"))) >= 2, 240, "2 finished shards")
    assert not store.is_done(gen), "generate finished before the signal"
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    # the first run ends (requeued: PENDING again, or already running its second attempt)
    log_err = Path(ledger(cfg, "generate")["stderr"])
    wait_until(
        lambda: (
            "Requeued job" in log_err.read_text(errors="replace")
            or "Requeued job" in log_err.with_suffix(".out").read_text(errors="replace")
        ),
        60,
        "submitit to requeue the job",
    )
    before = {p.name: p.stat().st_mtime_ns for p in (gen / "shards").glob("*.json")}
    wait_until(lambda: store.is_done(gen), 300, "the requeued job to finish generate")
    states = [r["State"] for r in sacct_jobs_d(jid)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    m = store.read_json(gen / store.MANIFEST)
    assert m["shards_skipped"] == len(before) >= 2 and m["n_shards"] > len(before)
    after = {p.name: p.stat().st_mtime_ns for p in (gen / "shards").glob("*.json")}
    assert all(after[k] == v for k, v in before.items())  # not recomputed
    got = ids(gen)
    ref = ids(stage_dir(compose(f"run_dir={reference_dir(reference)}", *small()), "generate"))
    assert got == ref and len(set(got)) == len(got) == m["rows"]
    text = log_err.read_text(errors="replace")
    assert "signal received; requeueing" in text and "Slurm restart count 1" in text


def sacct_jobs_d(jid: str, timeout: float = 30) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    while True:
        rows = sacct("-D", "-j", jid)
        if (rows and rows[-1]["State"] == "COMPLETED") or time.time() > deadline:
            return rows
        time.sleep(1)


def test_failing_stage_cancels_dependents_and_status_shows_its_log(tmp_path):
    """A teacher path that exists but is no model passes the login-node checks and fails
    inside the job: its dependents are cancelled, none left pending."""
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    over = [f"run_dir={tmp_path / 'run'}", "cluster=ci", *small(f"teacher.path={bad}")]
    cfg = compose(*over)
    proc = launch(*over, "stage=pairs", "wait=true", check=False, timeout=600)
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    gen = ledger(cfg, "generate")
    assert f"stage generate: job {gen['job_id']} FAILED; log: {gen['stderr']}" in err
    assert Path(gen["stderr"]).is_file() and "Traceback" in Path(gen["stderr"]).read_text()
    downstream = ["adherence", "pairs"]
    rows = sacct_jobs(ledger(cfg, s)["job_id"] for s in ["generate", *downstream])
    for s in downstream:
        r = rows[ledger(cfg, s)["job_id"]]
        assert r["State"].startswith("CANCELLED"), (s, r)
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not {ledger(cfg, s)["job_id"] for s in ["tasks", "generate", *downstream]} & set(queued)
    status = launch(*over, "stage=status").stdout
    lines = {ln.split()[0]: ln for ln in status.splitlines() if ln and not ln.startswith(" ")}
    assert lines["tasks"].split()[1] == "done"
    assert "failed" in lines["generate"] and gen["stderr"] in lines["generate"]
    assert "FAILED" in lines["generate"]
    for s in downstream:
        assert "cancelled" in lines[s], lines[s]
    for s in per_student_stages():
        assert "not started" in lines[s]


def test_plan_prints_jobs_and_gpu_hours_and_submits_nothing(tmp_path):
    def queue() -> set[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
        return set(out.stdout.split())

    before = queue()
    over = [f"run_dir={tmp_path}", "plan=true", *small()]
    out = launch(*over, "cluster=ci").stdout
    assert queue() <= before and not (tmp_path / ".slurm").exists()
    specs = stage_specs()
    for s in specs:
        line = next(ln for ln in out.splitlines() if ln.startswith(f"{s} "))
        assert "submit" in line and "0 GPU, 1 CPU, 2 GB, 60 min" in line, line
        needs = [n for n in specs[s].needs]
        for n in needs:
            assert f"{n}(new)" in line, line
    assert "jobs to submit: " + str(len(specs)) in out
    assert "GPU-hours (upper bound, GPUs x time limit of each new job): 0.0" in out
    gpu = launch(*over, "cluster=example_h100").stdout  # a GPU site profile, planned only
    n_gpu = sum(1 for s in specs.values() if s.gpu)
    assert "8 GPU, 96 CPU, 200 GB, 1440 min" in gpu
    assert (
        f"GPU-hours (upper bound, GPUs x time limit of each new job): {n_gpu * 8 * 24:.1f}" in gpu
    )
    assert queue() <= before


def test_ray_cluster_starts_and_stops_inside_a_slurm_job(tmp_path):
    """Head-only Ray (one node) from cpt.slurm.ray_cluster and from slurm/ray_cluster.sh."""
    script = tmp_path / "ray.sh"
    script.write_text(
        "#!/usr/bin/env bash\nset -euo pipefail\n"
        f"cd {REPO}\nexport PATH={Path(sys.executable).parent}:$PATH\n"
        "source slurm/ray_cluster.sh\nray_cluster_start\n"
        'python -c \'import ray; ray.init(address="auto", log_to_driver=False); '
        'print("SHELL", len(ray.nodes()), int(ray.cluster_resources()["CPU"]))\'\n'
        "ray_cluster_stop\n"
        "python - <<'EOF'\n"
        "import os, ray\n"
        "from cpt.slurm import ray_cluster\n"
        "with ray_cluster() as address:\n"
        "    assert os.environ['RAY_ADDRESS'] == address\n"
        "    ray.init(address=address, log_to_driver=False)\n"
        "    f = ray.remote(lambda: os.environ.get('SLURM_JOB_ID'))\n"
        "    print('PY', len(ray.nodes()), ray.get(f.remote()) == os.environ['SLURM_JOB_ID'])\n"
        "print('PY_STOPPED', ray.is_initialized(), 'RAY_ADDRESS' in os.environ)\n"
        "EOF\n"
        'pgrep -f "ray-cpt-$SLURM_JOB_ID" >/dev/null && echo LEFTOVER || echo CLEAN\n'
    )
    out = tmp_path / "ray.out"
    subprocess.run(
        ["sbatch", "--wait", "-c", "2", "--mem=2G", "-t", "10", "-o", str(out), str(script)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    text = out.read_text()
    assert "SHELL 1 2" in text and "PY 1 True" in text, text[-3000:]
    assert "PY_STOPPED False False" in text and "CLEAN" in text, text[-3000:]
