"""Warm engines across stages (`cpt.warm`), real Ray and the tiny model on the hf engine:
consecutive stages that use the same model and engine settings share one loaded engine
(one Ray actor, one load, said in the manifests), other settings load their own, and no
replica outlives a stage that trains, an error, or the run."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import compose

from cpt import graph, pipeline, store
from cpt.config import SamplingConfig
from cpt.generation import GenerateFactory, JudgeFactory, run_rows
from cpt.graph import TRAIN, StageContext, StageSpec
from cpt.rows import work_row

pytestmark = pytest.mark.usefixtures("ray_local")


def _engine_stage(name: str, role: str, needs: tuple[str, ...] = (), **model_changes) -> StageSpec:
    """A stage that runs 4 rows (2 shards) through the `role` model: `teacher` generates,
    `judge` judges; `model_changes` alter its engine settings."""

    def run(ctx: StageContext) -> dict:
        cfg = ctx.cfg
        model = dataclasses.replace(getattr(cfg, role), **model_changes)
        if role == "judge":
            factory = JudgeFactory(model, cfg.engine, cfg.prompts.judge_repair, 1)
        else:
            factory = GenerateFactory(model, cfg.engine)
        rows = [
            work_row(store.content_hash([name, i]), [{"role": "user", "content": f"hi {i}"}], 0)
            for i in range(4)
        ]
        stats = run_rows(
            rows, ctx.out_dir, 2, factory, model, cfg.engine, cfg.parallel, name, warm=ctx.warm
        )
        ACTORS[name] = [a for e in ctx.warm.entries.values() for a in e.pool.actors]
        return stats.as_dict()

    return StageSpec(name, needs, lambda cfg: name, run, runs=(role,))


def _stage(name: str, needs: tuple[str, ...], run: Callable, runs: tuple[str, ...] = ()):
    return StageSpec(name, needs, lambda cfg: name, run, runs=runs)


ACTORS: dict[str, list] = {}  # the warm replicas each engine stage left behind


def _run(tmp_path: Path, *specs: StageSpec, warm: bool = True) -> graph.RunPlan:
    ACTORS.clear()
    cfg = compose(f"run_dir={tmp_path}", f"parallel.warm={str(warm).lower()}")
    plan = graph.resolve(cfg, {s.name: s for s in specs})
    pipeline.run_plan(plan)
    return plan


def _manifest(plan: graph.RunPlan, stage: str) -> dict:
    return store.read_json(plan[stage].folder / "manifest.json")


def _pids(plan: graph.RunPlan, stage: str) -> set[int]:
    """The processes that wrote the stage's shards (a replica's engine lives in one)."""
    return {r["pid"] for r in store.finished_shards(plan[stage].folder, 2).values()}


def _dead(actors: list) -> bool:
    """Whether every actor is gone (a kill lands asynchronously: asked again for up to 60 s)."""
    import ray
    from ray.exceptions import RayActorError

    for actor in actors:
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.get(actor.load_seconds.remote(), timeout=60)
            except RayActorError:
                break
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    return bool(actors)


def test_the_same_model_in_consecutive_stages_is_loaded_once(tmp_path):
    plan = _run(
        tmp_path,
        _engine_stage("first", "judge"),  # e.g. adherence, then evaluate's judging:
        _engine_stage("second", "judge", ("first",), sampling=SamplingConfig(32, 0.3)),
    )  # (sampling is per request: not part of the engine's identity)
    first, second = _manifest(plan, "first"), _manifest(plan, "second")
    (loaded,) = first["engines"]
    assert loaded["model"] == "builtin:tiny" and loaded["engine"] == "hf"
    assert loaded["reused_from"] is None and loaded["load_seconds"] > 0
    assert first["load_seconds"] == loaded["load_seconds"]
    (reused,) = second["engines"]
    assert reused["reused_from"] == "first" and reused["key"] == loaded["key"]
    assert reused["load_seconds"] == 0 and second["load_seconds"] == 0
    assert len(_pids(plan, "first")) == 1 and _pids(plan, "second") == _pids(plan, "first")
    assert ACTORS["second"] == ACTORS["first"] and _dead(ACTORS["second"])  # closed at the end


def test_other_engine_settings_load_anew_and_the_warm_engine_is_closed_first(tmp_path):
    plan = _run(
        tmp_path,
        _engine_stage("first", "teacher"),
        _engine_stage("other", "teacher", ("first",), max_model_len=2048),
    )
    (other,) = _manifest(plan, "other")["engines"]
    assert other["reused_from"] is None and other["load_seconds"] > 0
    assert other["key"] != _manifest(plan, "first")["engines"][0]["key"]
    assert _pids(plan, "other").isdisjoint(_pids(plan, "first"))
    assert _dead(ACTORS["first"])


def test_warm_off_loads_in_every_stage(tmp_path):
    plan = _run(
        tmp_path,
        _engine_stage("first", "teacher"),
        _engine_stage("second", "teacher", ("first",)),
        warm=False,
    )
    assert [e["reused_from"] for e in _manifest(plan, "second")["engines"]] == [None]
    assert _pids(plan, "second").isdisjoint(_pids(plan, "first"))
    assert ACTORS == {"first": [], "second": []}  # nothing kept


def test_warm_engines_are_closed_before_a_stage_that_trains(tmp_path):
    seen = {}

    def train(ctx: StageContext) -> dict:  # what a training stage finds when it starts
        seen["warm"], seen["dead"] = dict(ctx.warm.entries), _dead(ACTORS["first"])
        return {}

    plan = _run(
        tmp_path,
        _engine_stage("first", "teacher"),
        _stage("train", ("first",), train, runs=(TRAIN,)),
    )
    assert seen == {"warm": {}, "dead": True}
    assert _manifest(plan, "train")["engines"] == []


def test_an_error_in_a_stage_closes_the_warm_engines(tmp_path):
    def boom(ctx: StageContext) -> dict:
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        _run(tmp_path, _engine_stage("first", "teacher"), _stage("boom", ("first",), boom))
    assert _dead(ACTORS["first"])  # no replica leaked


def test_pipeline_stages_share_the_judge_engine(tmp_path):
    """The real stages: generate loads the tiny model, adherence's judge (the same model and
    engine settings) reuses it, in the same Ray actor."""
    over = ["stage=adherence", "tasks.num_tasks=2", "adherence.max_attempts=1"]
    cfg = compose(f"run_dir={tmp_path}", *over)
    pipeline.run(cfg)
    plan = pipeline.resolve(cfg)
    gen, adh = _manifest(plan, "generate"), _manifest(plan, "adherence")
    assert [e["reused_from"] for e in gen["engines"]] == [None] and gen["load_seconds"] > 0
    assert [e["reused_from"] for e in adh["engines"]] == ["generate"] and adh["load_seconds"] == 0

    def pids(stage: str, n: int) -> set[int]:
        return {r["pid"] for r in store.finished_shards(plan[stage].folder, n).values()}

    assert len(pids("generate", gen["n_shards"])) == 1
    assert pids("adherence", adh["n_shards"]) == pids("generate", gen["n_shards"])
