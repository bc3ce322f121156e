"""Generations cut at max_new_tokens: a counted category, left out of pairs, never judged."""

from __future__ import annotations

from conftest import compose

from cpt.generation import JudgeFactory
from cpt.judge import TRUNCATED, condition_parts, judge_grid
from cpt.stages.adherence import table2
from cpt.stages.pairs import build_pairs

TASKS = [{"id": "t-1", "text": "Write a note.", "split": "train", "genre": "letter"}]


def gens(finish: dict[str, str]) -> list[dict]:
    return [
        {"id": f"g-{lv}", "task_id": "t-1", "rubric": "concision", "level": lv, "sample_idx": 0,
         "kind": "rubric", "text": f"A {lv} note.", "ok": True, "finish_reason": reason}
        for lv, reason in finish.items()
    ]  # fmt: skip


def test_truncated_generations_are_left_out_of_pairs_and_counted():
    finish = {"low": "stop", "moderate": "length", "extremely_high": "stop"}
    for keep, rows_expected, dropped in ((False, 2, 1), (True, 6, 0)):
        cfg = compose("rubrics.include=[concision]", f"pairs.keep_truncated={keep}")
        sysprompts = {("concision", lv): [f"Be {lv}."] for lv in cfg.levels.names}
        rows, stats = build_pairs(cfg, TASKS, gens(finish), sysprompts, None)
        assert len(rows) == rows_expected  # 1 or 3 level pairs, both directions
        assert stats["dropped_truncated_generation"] == dropped
        texts = {m["content"] for r in rows for m in (*r["chosen"], *r["rejected"])}
        assert ("A moderate note." in texts) is keep


def test_truncated_responses_are_not_judged_but_counted(tiny_dir):
    cfg = compose("rubrics.include=[concision]")
    responses = [
        {**g, "text": '{"critique": "ok", "score": 50}'}
        for g in gens({"low": "stop", "moderate": "length"})
    ]
    tasks = {"t-1": "Write a note."}
    for judge_truncated in (False, True):
        rows = judge_grid(
            cfg, tasks, responses, "t", condition_parts, lambda g: {"kind": g["kind"]},
            b"k" * 32, judge_truncated,
        )  # fmt: skip
        assert [r["truncated"] for r in rows] == [False, True]  # visible either way
        judged, cut = JudgeFactory(cfg.judge, cfg.engine, "again", 1)()(rows)
        assert judged["attempts"] == 1 and judged["error"] != TRUNCATED
        if judge_truncated:
            assert cut["attempts"] == 1 and cut["error"] != TRUNCATED
        else:  # never sent to the judge: no score, no tokens, its own error
            assert (cut["ok"], cut["score"], cut["attempts"]) == (False, None, 0)
            assert cut["error"] == TRUNCATED and cut["completion_tokens"] == 0
    verdicts = [{"score": None, "ok": False, "error": e} for e in ("no JSON", TRUNCATED)]
    table = table2(cfg, [{**r, **v} for r, v in zip(rows, verdicts)]).to_pylist()
    total = next(t for t in table if t["rubric"] == "ALL")
    assert total["truncated"] == 1 and total["judge_failures"] == 1  # apart, not a failure
