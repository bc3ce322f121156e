"""The data stages end to end on the tiny models (real HF engine, real Ray), resume after
SIGKILL, determinism, judge-failure accounting, and pairs built from it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, compose, launch, pin_tiny

from cpt import store
from cpt.pipeline import stage_dir

pytestmark = pytest.mark.slow
FAST = ["tasks.num_tasks=4", "tasks.test_fraction=0.25"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """tasks -> generate -> sysprompts -> adherence -> pairs, through the real entry point."""
    d = tmp_path_factory.mktemp("run")
    launch(f"run_dir={d}", "stage=pairs", *FAST)
    return d


def folder(run_dir: Path, stage: str, *overrides: str) -> Path:
    return stage_dir(compose(f"run_dir={run_dir}", *FAST, *overrides), stage)


def test_every_stage_wrote_shards_and_a_manifest(run_dir):
    for stage in ("tasks", "generate", "sysprompts", "adherence", "pairs"):
        d = folder(run_dir, stage)
        assert store.is_done(d), stage
        m = store.read_json(d / "manifest.json")
        assert m["stage"] == stage and m["key"].startswith(d.name[:12])
        assert m["versions"]["torch"] and "commit" in m["git"]
        assert m["config"]["teacher"]["path"] == "builtin:tiny"
        assert m["n_shards"] == len(list((d / "shards").glob("*.parquet")))
        table = store.read_table(d)
        assert table.column_names[0] == "id" and len(set(table["id"].to_pylist())) == len(table)


def test_generate_grid(run_dir):
    cfg = compose(f"run_dir={run_dir}", *FAST)
    rows = store.read_table(folder(run_dir, "generate")).to_pylist()
    kinds = Counter(r["kind"] for r in rows)
    assert kinds == {"rubric": 4 * 2 * 3, "no_rubric": 4}  # tasks x rubrics x levels (+ baseline)
    assert all(
        r["completion_tokens"] > 0 and r["finish_reason"] in ("stop", "length") for r in rows
    )
    assert {r["level"] for r in rows if r["kind"] == "rubric"} == set(cfg.levels.names)
    first = json.loads(rows[0]["messages"])
    assert first[0]["role"] == "user"


def test_rerun_is_a_noop(run_dir):
    d = folder(run_dir, "pairs")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    proc = launch(f"run_dir={run_dir}", "stage=pairs", *FAST)
    assert "done already" in proc.stderr + proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


def test_adherence_table2(run_dir):
    d = folder(run_dir, "adherence")
    text = (d / "table2.md").read_text()
    assert (
        "| teacher | rubric | no rubric | low | moderate | extremely high | judge failures |"
        in text
    )
    rows = store.read_table(d).to_pylist()
    assert len(rows) == 4 * 2 * 3 + 4 * 2  # each generation once; baseline x each rubric
    for r in rows:
        assert (r["ok"] and 0 <= r["score"] <= 100) or (not r["ok"] and r["score"] is None)
    m = store.read_json(d / "manifest.json")
    assert m["judge_failures"] == sum(not r["ok"] for r in rows)


def test_pairs_both_directions_and_split_by_task(run_dir):
    rows = store.read_table(folder(run_dir, "pairs")).to_pylist()
    assert rows
    keys = {(r["task_id"], r["rubric"], r["level_chosen"], r["level_rejected"]) for r in rows}
    for t, rb, a, b in keys:
        assert (t, rb, b, a) in keys  # every pair in both directions
    train = {r["task_id"] for r in rows if r["split"] == "train"}
    test = {r["task_id"] for r in rows if r["split"] == "test"}
    assert train and test and not train & test
    for r in rows:
        assert r["prompt"][0] == {"role": "system", "content": r["system_prompt"]}
        assert r["prompt"][1]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
        assert r["chosen"] != r["rejected"]


def test_pairs_load_with_datasets(run_dir):
    import datasets

    d = folder(run_dir, "pairs")
    ds = datasets.load_dataset(
        "parquet",
        data_files={"train": str(store.shard_path(d, 0)), "test": str(store.shard_path(d, 1))},
    )
    assert set(ds) == {"train", "test"}
    row = ds["train"][0]
    assert row["prompt"][0]["role"] == "system" and row["chosen"][0]["role"] == "assistant"
    assert len(ds["train"]) + len(ds["test"]) == len(store.read_table(d))
    assert (
        "| split | rubric | chosen level | rejected level | rows |" in (d / "README.md").read_text()
    )


def test_judge_failures_are_retried_then_counted(tmp_path):
    """A judge cut off after 6 tokens cannot finish its JSON: every judgement fails after
    its retries and is counted, in the manifest and in Table 2, never scored."""
    over = [
        f"run_dir={tmp_path}",
        "tasks.num_tasks=2",
        "rubrics.include=[concision]",
        "generate.no_rubric=false",
        "judge.sampling.max_new_tokens=6",
        "adherence.max_attempts=2",
        "parallel.backend=inline",
    ]
    launch("stage=adherence", *over)
    d = stage_dir(compose(*over), "adherence")
    rows = store.read_table(d).to_pylist()
    assert rows and all(not r["ok"] and r["score"] is None and r["attempts"] == 2 for r in rows)
    assert store.read_json(d / "manifest.json")["judge_failures"] == len(rows)
    assert f"| {len(rows)} |" in (d / "table2.md").read_text().splitlines()[-1]


GEN = [
    "tasks.num_tasks=3",
    "rubrics.include=[concision,humour]",
    "generate.shard_size=2",
    "parallel.backend=inline",
]


def test_generate_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        launch(f"run_dir={d}", "stage=generate", *GEN)
    da, db = (stage_dir(compose(f"run_dir={d}", *GEN), "generate") for d in (a, b))
    assert da.name == db.name  # same key
    for i in range(store.read_json(da / "manifest.json")["n_shards"]):
        ta = store.read_shards(da, i + 1).slice(0).to_pylist()
        tb = store.read_shards(db, i + 1).slice(0).to_pylist()
        assert [(r["id"], r["messages"]) for r in ta] == [(r["id"], r["messages"]) for r in tb]
        assert [r["text"] for r in ta] == [r["text"] for r in tb]  # seeded sampling too


def test_sigkill_mid_generation_then_rerun_loses_and_duplicates_nothing(tmp_path):
    args = [
        sys.executable,
        str(REPO / "jobs/launch.py"),
        *pin_tiny([f"run_dir={tmp_path}", "stage=generate", *GEN]),
    ]
    cfg = compose(f"run_dir={tmp_path}", *GEN)
    d = stage_dir(cfg, "generate")
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((d / "shards").glob("*.json"))) < 2:
        time.sleep(0.05)
        assert proc.poll() is None, "generation finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_total = 3 * 2 * 3 + 3  # tasks x rubrics x levels + no-rubric baseline
    n_shards = -(-n_total // 2)
    survivors = store.finished_shards(d, n_shards)
    assert 2 <= len(survivors) < n_shards and not store.is_done(d)
    before = {i: store.shard_path(d, i).stat().st_mtime_ns for i in survivors}
    launch(*args[2:])
    assert store.is_done(d)
    m = store.read_json(d / "manifest.json")
    assert m["shards_skipped"] == len(survivors)  # finished shards were not recomputed
    assert before == {i: store.shard_path(d, i).stat().st_mtime_ns for i in survivors}
    ids = store.read_table(d)["id"].to_pylist()
    assert len(ids) == n_total and len(set(ids)) == n_total  # none missing, none duplicated


def test_a_beta_sweep_builds_the_reference_table_once(run_dir, tmp_path):
    """`-m train.beta=0.1,0.2`: the first train run computes reflogps/<student>-<key>/, the
    second reads it; each train manifest says which, and where (path + key)."""
    import shutil

    run = tmp_path / "run"
    keep = shutil.ignore_patterns(".hydra", "*.lock", "train", "evaluate", "report", "reflogps")
    shutil.copytree(run_dir, run, ignore=keep)
    launch("-m", f"run_dir={run}", *FAST, "stage=train", "train.beta=0.1,0.2", timeout=900)
    uses = [
        store.read_json(folder(run, "train", f"train.beta={beta}") / "manifest.json")["ref_table"]
        for beta in (0.1, 0.2)
    ]
    assert [u["status"] for u in uses] == ["computed", "reused"]
    assert uses[0]["path"] == uses[1]["path"] and uses[0]["key"] == uses[1]["key"]
    assert Path(uses[0]["path"]).parent == run / "reflogps" and store.is_done(uses[0]["path"])


@pytest.mark.timeout(2400)
def test_sweep_over_students_shares_data_stages_and_reports_both(run_dir):
    """The whole pipeline as a multirun over two students (one without a system role):
    data stages run once, one adapter and one evaluation per student, one report."""
    sweep = [
        f"run_dir={run_dir}",
        *FAST,
        "evaluate.samples=2",
        "parallel.backend=inline",  # Ray is covered by the fixture run; this one is long
        "evaluate.agreement_fraction=0.5",
        "report.n_boot=50",
    ]
    launch("-m", "student=tiny,tiny_nosys", *sweep, timeout=1800)
    assert len(list((run_dir / "generate").iterdir())) == 1  # shared by both students
    trains = sorted(p.name.split("-")[0] for p in (run_dir / "train").iterdir())
    assert trains == ["tiny", "tiny_nosys"]
    for student in ("tiny", "tiny_nosys"):
        t = stage_dir(compose(*sweep, f"student={student}"), "train")
        assert (t / "adapter" / "adapter_model.safetensors").exists()
        m = store.read_json(t / "manifest.json")
        assert m["steps"] > 0 and m["first_loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2
        e = stage_dir(compose(*sweep, f"student={student}"), "evaluate")
        rows = store.read_table(e).to_pylist()
        assert {r["model"] for r in rows} == {"base", "cpt"}
        assert {r["sample_idx"] for r in rows} == {0, 1}
    md = (run_dir / "report" / "report.md").read_text()
    assert "| tiny |" in md and "| tiny_nosys |" in md and "## Judge self-agreement" in md
    assert (run_dir / "report" / "plots" / "tiny_nosys_scores.png").exists()
    # re-render from the run folder alone: nothing is recomputed
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "evaluate").rglob("*") if p.is_file()}
    launch("stage=report", f"run_dir={run_dir}")
    assert before == {
        p: p.stat().st_mtime_ns for p in (run_dir / "evaluate").rglob("*") if p.is_file()
    }
    assert "| tiny_nosys |" in (run_dir / "report" / "report.md").read_text()
