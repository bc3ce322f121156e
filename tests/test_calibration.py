"""Judge calibration: agreement of two judges' scores (κ on levels, ρ on scores), and the
report's section comparing an LLM judge with the program judge on the same responses."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from conftest import compose

from cpt import program_judges, store
from cpt.calibration import judge_agreement, program_calibration
from cpt.metrics import LevelScale
from cpt.stages.report import render

SCALE = LevelScale(("low", "moderate", "extremely_high"), (40.0, 92.5, 100.0))


def test_identical_judges_agree_fully():
    a = [10, 50, 95, 30, 70, 99]
    got = judge_agreement(a, a, SCALE)
    assert got["n"] == 6 and got["level_agreement"] == 1.0 and got["cohen_kappa"] == 1.0
    assert got["spearman_rho"] == pytest.approx(1.0) and got["mean_abs_diff"] == 0.0


def test_known_kappa_and_reversed_ranks():
    # levels a: L L M M H H, b: L M M M H L -> observed 4/6; expected (2*1 + 2*3 + 2*1)/36
    a, b = [10, 20, 50, 60, 95, 99], [10, 50, 60, 70, 95, 5]
    got = judge_agreement(a, b, SCALE)
    expected = (2 * 2 + 2 * 3 + 2 * 1) / 36
    assert got["level_agreement"] == pytest.approx(4 / 6)
    assert got["cohen_kappa"] == pytest.approx((4 / 6 - expected) / (1 - expected))
    assert judge_agreement([1, 2, 3], [90, 50, 10], SCALE)["spearman_rho"] == pytest.approx(-1.0)


def test_empty_and_mismatched():
    assert judge_agreement([], [], SCALE)["n"] == 0
    assert math.isnan(judge_agreement([], [], SCALE)["cohen_kappa"])
    with pytest.raises(ValueError, match="paired scores"):
        judge_agreement([1, 2], [1], SCALE)


def responses() -> list[tuple[str, float, bool]]:
    """(response, LLM score, judge ok): an LLM judge that tracks length, with one miss,
    one failed judgement and one empty response (neither compared)."""
    texts = [" ".join(["w"] * n) for n in (5, 15, 30, 50, 80, 150)]
    llm = [97.0, 95.0, 80.0, 20.0, 30.0, 5.0]  # the 15-word answer is called extremely high
    return [*zip(texts, llm, [True] * 6), ("w " * 10, 0.0, False), ("", 99.0, True)]


def test_program_calibration_per_rubric():
    import pandas as pd

    rows = [
        {"part_rubric": r, "response": t, "score": s, "ok": ok}
        for r in ("concision-words", "humour")
        for t, s, ok in responses()
    ]
    cal = program_calibration(pd.DataFrame(rows), SCALE)
    assert list(cal["rubric"]) == ["concision-words"]  # humour has no program
    row = cal.iloc[0]
    assert row["rows"] == 8 and row["not_compared"] == 2 and row["n"] == 6
    assert row["level_agreement"] == pytest.approx(5 / 6)
    prog = [program_judges.concision_words(t).score for t, _, _ in responses()[:6]]
    assert row["mean_program_score"] == pytest.approx(sum(prog) / 6)


def fake_llm_evaluation(run_dir, judge_kind: str) -> None:
    rows = [
        {
            "id": f"j{i}-{model}",
            "gen_id": f"g{i}-{model}",
            "student": "tiny",
            "model": model,
            "task_id": f"t{i}",
            "rubric": "concision-words",
            "level": "moderate",
            "part_rubric": "concision-words",
            "part_level": "moderate",
            "sample_idx": 0,
            "response": text,
            "score": score,
            "critique": "c",
            "ok": ok,
        }
        for i, (text, score, ok) in enumerate(responses())
        for model in ("base", "cpt")
    ]
    d = run_dir / "evaluate" / "tiny-abc"
    store.write_shard(d, 0, pa.Table.from_pylist(rows), {})
    config = {"student": {"name": "tiny", "path": "builtin:tiny"}, "judge": {"kind": judge_kind}}
    store.mark_done(d, {"key": "abc", "n_shards": 1, "config": config})


def test_report_shows_calibration_of_an_llm_judge(tmp_path):
    fake_llm_evaluation(tmp_path, "model")
    render(compose(f"run_dir={tmp_path}", "report.n_boot=0"), tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    section = md.split("## Judge calibration against program judges")[1].split("\n## ")[0]
    assert "| tiny | concision-words | 16 | 4 | 12 |" in section  # rows, not compared, n


def test_report_skips_calibration_when_the_judge_is_the_program(tmp_path):
    fake_llm_evaluation(tmp_path, "program")
    render(compose(f"run_dir={tmp_path}", "report.n_boot=0"), tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "_No LLM-judged rubric with a program judge._" in md
