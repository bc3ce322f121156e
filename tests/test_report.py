"""The report renders from finished evaluation folders only: tables, paper numbers beside
ours, judge failures counted, agreement, readable PNG plots."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pyarrow.parquet
from conftest import compose

from cpt import store
from cpt.report import judge_agreement, table3
from cpt.stages.report import render

LEVELS = ["low", "moderate", "extremely_high"]
CENTRE = {"low": 20, "moderate": 66, "extremely_high": 97}


def fake_evaluation(
    run_dir,
    student: str,
    path: str,
    fail_every: int = 7,
    panel: tuple[str, ...] = (),
    gen_fail_every: int = 0,
) -> None:
    """An evaluate/ folder as the evaluate stage writes it (CPT near target, base noisy);
    `panel`: extra judges whose scores differ from the main judge's by a little noise."""
    rng = random.Random(0)
    rows, i = [], 0
    for t in range(6):
        for rubric in ("humour", "concision"):
            for level in LEVELS:
                for model in ("base", "cpt"):
                    for s in range(2):
                        i += 1
                        gen_ok = not gen_fail_every or i % gen_fail_every != 0
                        ok = i % fail_every != 0 and gen_ok
                        noise = 35 if model == "base" else 8
                        score = min(100, max(0, CENTRE[level] + rng.uniform(-noise, noise)))
                        rows.append(
                            {
                                "id": f"{student}-{i}",
                                "gen_id": f"g{i}",
                                "student": student,
                                "model": model,
                                "task_id": f"t{t}",
                                "rubric": rubric,
                                "level": level,
                                "part_rubric": rubric,
                                "part_level": level,
                                "sample_idx": s,
                                "response": "r",
                                "score": round(score) if ok else None,
                                "critique": "c",
                                "ok": ok,
                                "error": "" if ok else "not JSON",
                                "attempts": 1,
                                "generation_ok": gen_ok,
                            }
                        )
    d = run_dir / "evaluate" / f"{student}-abc"
    store.write_shard(d, 0, pa.Table.from_pylist(rows), {})
    again = [{**r, "id": "a" + r["id"], "first_id": r["id"]} for r in rows[::4]]
    store.write_shard(d / "agreement", 0, pa.Table.from_pylist(again), {})
    for name in panel:
        other = [
            {
                **r,
                "score": None
                if r["score"] is None
                else min(100, max(0, r["score"] + rng.randint(-9, 9))),
            }
            for r in rows
        ]
        store.write_shard(d / "panel" / name, 0, pa.Table.from_pylist(other), {})
    store.mark_done(
        d,
        {
            "key": "abc",
            "n_shards": 1,
            "agreement": {"n_shards": 1},
            "panel": {name: {"n_shards": 1} for name in panel},
            "config": {
                "student": {"name": student, "path": path},
                "judge": {"name": "judge_a", "sampling": {"temperature": 0.0}},
                "prompts": {"name": "paper"},
            },
        },
    )


def fake_training(run_dir, student: str) -> None:
    d = run_dir / "train" / f"{student}-abc"
    d.mkdir(parents=True)
    steps = list(range(1, 9))
    pa.parquet.write_table(
        pa.table(
            {
                "step": steps,
                "loss": [0.693 - 0.05 * s for s in steps],
                "rewards/accuracies": [min(1.0, 0.4 + 0.1 * s) for s in steps],
                "rewards/margins": [0.1 * s for s in steps],
            }
        ),
        d / "metrics.parquet",
    )
    store.mark_done(
        d,
        {
            "rows": 40,
            "steps": 8,
            "n_shards": 0,
            "config": {"student": {"name": student}, "train": {"name": "paper"}},
        },
    )


def test_report_renders_tables_and_plots(tmp_path):
    fake_evaluation(tmp_path, "qwen3_4b", "Qwen/Qwen3-4B")
    fake_evaluation(tmp_path, "tiny", "builtin:tiny", panel=("judge_b",))
    fake_training(tmp_path, "tiny")
    cfg = compose(f"run_dir={tmp_path}", "report.n_boot=200")
    out = tmp_path / "report"
    stats = render(cfg, out)
    md = (out / "report.md").read_text()
    assert stats["students"] == ["qwen3_4b", "tiny"]
    assert "| student | tasks | judged (base / CPT) | Acc base → CPT |" in md
    assert "| qwen3_4b | 6 | " in md  # n says how many test tasks
    assert "Acc 0.63 → 0.77" in md  # the paper's Qwen3-4B row beside ours
    assert "| tiny | 6 | " in md and "not in the paper" in md
    assert "Teacher prompt template: paper (the target level in words only" in md
    assert "Code: {" not in md
    # a panel of two judges: each judge, the mean, and their agreement
    assert "Judges: judge_a, judge_b (scores below: the panel mean)" in md
    assert "### Judge panel" in md and "| judge_a | judge_b |" in md
    assert "cohen_kappa" in md
    # greedy judge: the repeated judgements are labelled a determinism check
    assert "Determinism check" in md
    # training section from the train metrics
    assert "## Training" in md and "| tiny | paper | 40 | 8 | 0.64 → 0.29 |" in md
    assert (out / "plots" / "training.png").stat().st_size > 5000
    # Best-of-N: the paper's rule, score per level for N = 1, 2
    assert "highest-scored of the first N" in md and "| N=1 | N=2 |" in md
    assert "## Judge failures" in md and "\n## Best-of-N" not in md  # per student: ###
    assert "### Best-of-N" in md and "### Confusion" in md and "## Judge self-agreement" in md
    # judge failures are counted, not scored: every 7th row failed
    assert stats["judge_failures"]["tiny"]["cpt"] > 0
    for name in (
        "qwen3_4b_scores",
        "qwen3_4b_best_of_n",
        "qwen3_4b_cpt_confusion",
        "tiny_base_confusion",
    ):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"plots/{name}.png" in md
    metrics = store.read_json(out / "metrics.json")
    assert metrics["tiny"]["cpt"]["accuracy"] > metrics["tiny"]["base"]["accuracy"]


def test_report_with_no_evaluations_says_so(tmp_path):
    render(compose(f"run_dir={tmp_path}"), tmp_path / "report")
    assert "No finished evaluation yet" in (tmp_path / "report" / "report.md").read_text()


def test_table3_shows_nan_as_nan():
    nan = float("nan")
    s = {
        "n": 1,
        "judge_failures": 0,
        **{f"{m}": nan for m in ("accuracy", "kendall_tau", "spearman_rho")},
        **{f"{m}_ci": (nan, nan) for m in ("accuracy", "kendall_tau", "spearman_rho")},
    }
    text = table3({"x": {"cpt": s}}, {})
    assert "not in the paper" in text
    assert "NaN [NaN, NaN]" in text


def test_judge_agreement():
    import pandas as pd

    first = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "score": [10.0, 50.0, 95.0, None],
            "ok": [True, True, True, False],
        }
    )
    second = pd.DataFrame(
        {
            "first_id": ["a", "b", "c", "d"],
            "score": [30.0, 95.0, 99.0, 5.0],
            "ok": [True, True, True, True],
        }
    )
    got = judge_agreement(first, second, compose().levels.scale)
    assert (got["pairs"], got["compared"], got["failed_pairs"]) == (4, 3, 1)
    assert math.isclose(got["level_agreement"], 2 / 3)
    assert math.isclose(got["mean_abs_diff"], (20 + 45 + 4) / 3)


def test_best_of_n_plot_with_one_sample_or_no_scores(tmp_path):
    # evaluate.samples=1 gives one N; a run whose judgements all failed gives no scores
    import pandas as pd

    from cpt.plots import plot_best_of_n

    scale = compose().levels.scale
    one = pd.DataFrame(
        {
            "n": [1, 1],
            "model": ["base", "cpt"],
            "target_level": ["low", "low"],
            "mean_score": [float("nan"), 30.0],
            "accuracy": [0.0, 1.0],
        }
    )
    for name, frame in (("one", one), ("empty", one.iloc[:0])):
        plot_best_of_n(frame, frame, scale, name, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_generations_are_counted_per_model_and_never_scored():
    import pandas as pd

    from cpt.report import generation_failures, judged_frame

    def row(i: int, model: str, gen_ok: bool, part: str = "humour") -> dict:
        ok = gen_ok  # the judge refused failed generations: ok False, no score
        return {"id": f"j{i}{part}", "gen_id": f"g{i}", "student": "s", "model": model,
                "task_id": "t", "part_rubric": part, "part_level": "low", "sample_idx": 0,
                "score": 10.0 if ok else None, "ok": ok, "generation_ok": gen_ok,
                "not_judged": "" if gen_ok else "generation failed: not judged"}  # fmt: skip

    rows = pd.DataFrame(
        [row(1, "base", True), row(2, "base", False), row(2, "base", False, "concision"),
         row(3, "cpt", True), row(4, "cpt", True)]
    )  # fmt: skip
    frame = judged_frame(rows)
    assert len(frame) == 3 and frame["judge_ok"].all()  # not judge failures, not scores
    assert generation_failures(rows) == {"base": 1, "cpt": 0}  # per response, per model


def test_report_counts_generation_failures_apart_from_judge_failures(tmp_path):
    fake_evaluation(tmp_path, "tiny", "builtin:tiny", fail_every=1000, gen_fail_every=9)
    stats = render(compose(f"run_dir={tmp_path}", "report.n_boot=20"), tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert stats["generation_failures"]["tiny"] == {"base": 8, "cpt": 8}  # 144 rows, every 9th
    assert stats["judge_failures"]["tiny"] == {"base": 0, "cpt": 0}  # not counted as judged
    assert "## Generation failures" in md and "- tiny: base 8, cpt 8" in md
