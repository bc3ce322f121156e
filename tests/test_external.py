"""External CPT models (the paper released full checkpoints, not adapters) are evaluated
as given, with no train stage; a panel of two judges scores them; the report shows the
paper's Best-of-N curve for N = 1, 2, 4 and the judges' agreement."""

from __future__ import annotations

import shutil

import pytest
from conftest import launch

from cpt import store
from cpt.stages.evaluate import tuned_kind

pytestmark = pytest.mark.slow
TINY = ["teacher=tiny", "judge=tiny", "student=tiny", "parallel.backend=inline"]
# 1 test task x 1 rubric x 3 levels x (base, cpt) x 4 samples, judged by two judges
FAST = [
    "tasks.num_tasks=3",
    "tasks.test_fraction=0.34",
    "rubrics.include=[concision]",
    "evaluate.agreement_fraction=0.1",
    "engine.batch_size=24",
    "evaluate.shard_size=48",
]


def test_tuned_kind(tmp_path, tiny_dir):
    assert tuned_kind("") == ""
    assert tuned_kind("vicgalle/configurable-preference-qwen3-4b") == "full"
    assert tuned_kind(str(tiny_dir)) == "full"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert tuned_kind(str(tmp_path)) == "adapter"


def test_external_full_checkpoint_is_evaluated_without_a_train_stage(tmp_path, tiny_dir):
    released = tmp_path / "released-cpt-model"  # a saved full model, as the paper released
    shutil.copytree(tiny_dir, released)
    run = tmp_path / "run"
    proc = launch(
        f"run_dir={run}",
        *TINY,
        *FAST,
        f"evaluate.tuned={released}",
        "evaluate.samples=4",
        "+panel=tiny_pair",
        timeout=1800,  # minutes on a busy 2-core machine; ~1 min alone
    )
    # only what the evaluation needs ran: no generation, pairs or training
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "evaluate",
        "report",
        "sysprompts",
        "tasks",
    ]
    (ev,) = (run / "evaluate").glob("tiny-*")
    m = store.read_json(ev / "manifest.json")
    assert m["tuned"] == str(released) and m["adapter"] == ""
    n_cpt = m["responses"]["cpt"]["n_shards"]
    cpt_rows = store.read_shards(ev / "responses_cpt", n_cpt).to_pylist()
    assert cpt_rows and {r["model"] for r in cpt_rows} == {"cpt"}
    assert set(m["panel"]) == {"tiny_nosys"}
    md = (run / "report" / "report.md").read_text()
    assert f"CPT model: external, `{released}` (no train stage)" in md
    assert "Judges: tiny, tiny_nosys (scores below: the panel mean)" in md
    assert "### Judge panel" in md and "| tiny | tiny_nosys |" in md
    assert "| N=1 | N=2 | N=4 |" in md  # the paper-rule curve of scores
    assert "![best of n](plots/tiny_best_of_n.png)" in md
    # the run ends on the report's path and its headline numbers
    tail = proc.stdout.strip().splitlines()
    assert tail[-2] == f"report: {run / 'report' / 'report.md'}"
    assert tail[-1].startswith("  tiny (1 test task): Acc ")
