"""The report renders from finished evaluation folders only: tables, paper numbers beside
ours, judge failures counted, agreement, readable PNG plots."""

from __future__ import annotations

import math
import random

import pyarrow as pa
from conftest import compose

from cpt import store
from cpt.report import judge_agreement, table3
from cpt.stages.report import render

LEVELS = ["low", "moderate", "extremely_high"]
CENTRE = {"low": 20, "moderate": 66, "extremely_high": 97}


def fake_evaluation(
    run_dir, student: str, path: str, fail_every: int = 7, gen_fail_every: int = 0
) -> None:
    """An evaluate/ folder as the evaluate stage writes it (CPT near target, base noisy)."""
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
    store.mark_done(
        d,
        {
            "key": "abc",
            "n_shards": 1,
            "agreement": {"n_shards": 1},
            "config": {"student": {"name": student, "path": path}},
        },
    )


def test_report_renders_tables_and_plots(tmp_path):
    fake_evaluation(tmp_path, "qwen3_4b", "Qwen/Qwen3-4B")
    fake_evaluation(tmp_path, "tiny", "builtin:tiny")
    cfg = compose(f"run_dir={tmp_path}", "report.n_boot=200")
    out = tmp_path / "report"
    stats = render(cfg, out)
    md = (out / "report.md").read_text()
    assert stats["students"] == ["qwen3_4b", "tiny"]
    assert "| student | n | Acc base → CPT |" in md
    assert "Acc 0.63 → 0.77" in md  # the paper's Qwen3-4B row beside ours
    assert "## Judge failures" in md and "\n## Best-of-N" not in md  # per student: ###
    assert "### Best-of-N" in md and "### Confusion" in md and "## Judge agreement" in md
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
