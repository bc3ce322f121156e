"""The GPU-hour planner (`cpt/planner.py`, `cpt/workload.py`): work counted from the config
matches what the stages ran, the throughput table is learnt from manifests, `plan=true`
shows wall time and GPU-hours (or says what is not calibrated), manifests hold predicted vs
actual, and `plan=probe` runs every stage, small, in its own folder, then plans."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose, launch

from cpt import planner, store, workload
from cpt.config import ConfigError, resolve_recipe
from cpt.pipeline import resolve, run, stage_specs

# 3 tasks x 1 rubric x 3 levels, short generations, the inline runner, small shards; the
# probe (2 tasks) does less than the run it calibrates
SMALL = [
    "tasks.num_tasks=3",
    "tasks.test_fraction=0.34",
    "rubrics.include=[concision]",
    "generate.no_rubric=false",
    "parallel.backend=inline",
    "teacher.sampling.max_new_tokens=16",
    "judge.sampling.max_new_tokens=32",
    "student.sampling.max_new_tokens=16",
    "adherence.max_attempts=1",
    "generate.shard_size=4",
    "adherence.shard_size=2",
    "train.max_steps=2",
    "train.save_steps=2",
    "train.grad_accum=1",
    "evaluate.samples=1",
    "evaluate.baseline=false",
    "evaluate.judge_max_attempts=1",
    "evaluate.agreement_fraction=0.5",
    "report.n_boot=10",
]
MODEL_STAGES = ("generate", "sysprompts", "adherence", "train", "evaluate")


def planned(*over: str):
    cfg = resolve_recipe(compose(*over))[0]
    return cfg, resolve(cfg)


def fake_manifest(run_dir: Path, stage: str, seconds: float, phases: list[dict]) -> None:
    d = run_dir / stage / "0123456789ab"
    manifest = {"stage": stage, "key": "k", "seconds": seconds, "device": "cpu", "phases": phases}
    store.mark_done(d, manifest)


def phase(kind: str, model: str, requests: int, bound: int, tokens: int, s: float, work: float):
    return {
        "label": kind,
        "kind": kind,
        "model": model,
        "engine": "hf",
        "requests": requests,
        "prompt_tokens": 10 * requests,
        "bound_tokens": bound,
        "units": bound,
        "completion_tokens": tokens,
        "seconds": s,
        "work_seconds": work,
    }


def test_the_table_is_learnt_from_manifests_and_predicts_from_it(tmp_path):
    run_dir = tmp_path / "run"
    # 40 s of generation for 100 of 200 bound tokens after 5 s of start-up, in a 50 s stage
    fake_manifest(
        run_dir, "generate", 50.0, [phase("generate", "builtin:tiny", 4, 200, 100, 45, 40)]
    )
    fake_manifest(run_dir, "tasks", 2.0, [])
    cfg, plan = planned(f"run_dir={tmp_path / 'new'}", f"planner.learn_from=[{run_dir}]", *SMALL)
    table = planner.learn(cfg)
    rates = table.rates()
    rate = rates["generate | builtin:tiny | hf | cpu"]
    assert (rate.tokens, rate.bound, rate.work_seconds, rate.load_seconds) == (100, 200, 40, 5)
    assert rates["generate:generate | builtin:tiny | hf | cpu"] == rate  # the stage's own too
    assert table.overheads() == {("generate", "cpu"): 5.0, ("tasks", "cpu"): 2.0}
    saved = store.read_json(planner.table_path(cfg))  # the learnt table, on disk
    assert "generate | builtin:tiny | hf | cpu" in saved["rates"] and len(saved["samples"]) == 2
    assert planner.learn(cfg).samples == table.samples  # learnt again: nothing counted twice
    pred = planner.predict(cfg, plan["generate"], table)
    bound = sum(p.bound_tokens for p in pred.phases)  # 9 rows x 16 tokens
    # hf decodes batches step by step: shards of 4, 4 and 1 rows, 3 batches x 16 steps
    units = sum(p.units for p in pred.phases)
    assert (bound, units, pred.missing) == (144, 48, [])
    assert pred.seconds == pytest.approx(5.0 + 5.0 + units * 40 / 200)
    assert pred.completion_tokens == 72  # half of the bound, as measured
    assert planner.predict(cfg, plan["tasks"], table).seconds == 2.0
    judged = planner.predict(cfg, plan["adherence"], table)  # the judge was never measured
    assert judged.seconds is None
    assert judged.missing == [
        "no calibration for (adherence stage, cpu)",
        "no calibration for (judge, builtin:tiny, hf, cpu)",
    ]


def test_work_units_follow_the_engine():
    cfg = compose(*SMALL, "engine.batch_size=3")
    model = cfg.teacher  # 16 new tokens
    # 10 rows in shards of 4: batches of 3 within each shard (3+1, 3+1, 2)
    assert workload.work_units(cfg, model, 10, 4) == 5 * 16
    vllm = compose(*SMALL, "engine=vllm")
    assert workload.work_units(vllm, vllm.teacher, 10, 4) == 10 * 16  # tokens


def test_plan_without_calibration_says_so_and_invents_nothing(tmp_path, capsys):
    run(compose(f"run_dir={tmp_path}", "plan=true", *SMALL))
    out = capsys.readouterr().out
    assert "no calibration for (generate, builtin:tiny, hf, cpu): run plan=probe" in out
    assert "predicted wall time: 0 s, GPU-hours: 0.00 (8 stages not calibrated)" in out
    assert not list(tmp_path.glob("*/*/_SUCCESS"))  # nothing ran


def test_plan_mode_is_checked():
    with pytest.raises(ConfigError, match="plan: must be one of true, false, probe"):
        compose("plan=maybe")


# ------------------------------------------------------------- probe, then a calibrated run


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """`plan=probe` (every stage on 2 tasks in <run_dir>/.cpt/probe, then the plan), then
    the real run in the same run_dir, predicted from the probe."""
    d = tmp_path_factory.mktemp("planned")
    probe_out = launch(f"run_dir={d}", "plan=probe", *SMALL).stdout
    launch(f"run_dir={d}", *SMALL)
    return d, probe_out


def manifests(run_dir: Path) -> dict[str, dict]:
    out = {}
    for name in stage_specs():
        for m in (*run_dir.glob(f"{name}/*/manifest.json"), *run_dir.glob(f"{name}/manifest.json")):
            out[name] = store.read_json(m)
    return out


@pytest.mark.slow
def test_probe_runs_every_stage_small_and_stops(calibrated):
    d, out = calibrated
    probe = manifests(planner.probe_dir(d))
    assert set(probe) == set(stage_specs())  # every stage, in the probe's own folder
    full = manifests(d)
    assert probe["tasks"]["rows"] == 2 < full["tasks"]["rows"]
    for name in ("generate", "adherence"):
        assert probe[name]["n_shards"] < full[name]["n_shards"], name
    assert probe["train"]["steps"] == 2
    # then it planned, every stage calibrated by the probe: wall time and GPU-hours
    assert "no calibration" not in out, out
    assert "predicted wall time: " in out and "GPU-hours: 0.00" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert all(rows[s].split()[3] != "?" for s in stage_specs()), out


@pytest.mark.slow
def test_estimated_work_matches_what_the_stages_ran(calibrated):
    d, _ = calibrated
    cfg, plan = planned(f"run_dir={d}", *SMALL)
    full = manifests(d)
    for name in MODEL_STAGES:
        estimated = {p.label: p for p in plan[name].spec.estimate(cfg)}
        ran = {p["label"]: p for p in full[name]["phases"]}
        assert set(estimated) == set(ran), name
        for label, p in ran.items():
            assert estimated[label].requests == p["requests"], (name, label)
            assert estimated[label].bound_tokens == p["bound_tokens"], (name, label)
            assert p["completion_tokens"] <= p["bound_tokens"] or p["kind"] == "judge"


@pytest.mark.slow
def test_manifests_hold_predicted_and_actual_and_the_report_shows_both(calibrated):
    d, _ = calibrated
    for name, m in manifests(d).items():
        assert m["device"] == "cpu"
        assert m["actual"]["seconds"] == m["seconds"], name
        pred = m["predicted"]
        assert pred["seconds"] is not None and pred["missing"] == [], name
        if name in MODEL_STAGES:
            assert m["actual"]["completion_tokens"] > 0 and pred["completion_tokens"] > 0
    report = (d / "report" / "report.md").read_text()
    section = report.split("## Planner: predicted vs actual per stage")[1].split("##")[0]
    for name in stage_specs():
        if name != "report":
            assert f"| {name}/" in section, section
