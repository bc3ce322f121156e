"""The paper's released data, read from small local files of the same shape (no hub here):
the raw dataset (prompt, rubric, target, response, generating model) and the DPO pairs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt.importers import (
    DataSource,
    ImportDataError,
    PairColumns,
    RawColumns,
    import_pairs,
    import_raw,
)
from cpt.metrics import LevelScale

SCALE = LevelScale(("low", "moderate", "extremely_high"), (40.0, 92.5, 100.0))
QUALIFIERS = {"low": "low", "moderate": "moderate", "extremely_high": "extremely high"}
CHAOS = 'The "Chaos Cinema Critique" Anti-Rubric: A Manifesto for the Absurd ...'
ROCOCO = 'The "Rococo Reviewer" Anti-Rubric: A Symphony of Excess ...'


def raw_rows() -> list[dict]:
    rows = []
    for prompt in ("Review the film Alien.", "Review the film Heat."):
        for rubric in (CHAOS, ROCOCO):
            for target in ("low", "moderate", "extremely high"):
                rows.append(
                    {
                        "prompt": prompt,
                        "rubric": rubric,
                        "score_target": target,
                        "generation": f"{target} take on {prompt}",
                        "generator": "deepseek-r1",
                    }
                )
    rows.append({**rows[0], "score_target": "95", "generation": "second sample, a score"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MAPPING = RawColumns(target="score_target", response="generation", model="generator")


def test_raw_dataset_with_a_column_mapping(tmp_path):
    src = DataSource(str(write_jsonl(tmp_path / "raw.jsonl", raw_rows())))
    got = import_raw(src, SCALE, MAPPING, QUALIFIERS)
    assert len(got.tasks) == 2 and {t.text for t in got.tasks} == {
        "Review the film Alien.",
        "Review the film Heat.",
    }
    assert len(got.rubrics) == 2 and set(got.rubrics.values()) == {CHAOS, ROCOCO}
    assert len(got.responses) == 13
    levels = [r["level"] for r in got.responses]
    assert levels[:3] == ["low", "moderate", "extremely_high"]  # qualifier -> level name
    last = got.responses[-1]
    assert last["level"] == "extremely_high" and last["sample_idx"] == 1  # 95 binned
    assert {r["model"] for r in got.responses} == {"deepseek-r1"}
    assert len({r["id"] for r in got.responses}) == 13
    name = got.responses[0]["rubric"]
    assert name.startswith("the-chaos-cinema-critique-") and got.rubrics[name] == CHAOS


def test_raw_dataset_from_a_saved_datasetdict_and_parquet(tmp_path):
    import datasets

    rows = raw_rows()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "creative-rubrics")
    )
    from_disk = import_raw(
        DataSource(str(tmp_path / "creative-rubrics")), SCALE, MAPPING, QUALIFIERS
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "raw.parquet")
    from_parquet = import_raw(DataSource(str(tmp_path / "raw.parquet")), SCALE, MAPPING, QUALIFIERS)
    assert from_disk.responses == from_parquet.responses
    with pytest.raises(ImportDataError, match="no split 'test'"):
        import_raw(DataSource(str(tmp_path / "creative-rubrics"), split="test"), SCALE, MAPPING)


def test_raw_dataset_errors_name_the_column_and_row(tmp_path):
    src = DataSource(str(write_jsonl(tmp_path / "raw.jsonl", raw_rows())))
    with pytest.raises(ImportDataError, match=r"column\(s\) \['score', 'response', 'model'\]"):
        import_raw(src, SCALE)  # default names do not match this file
    bad = [{**raw_rows()[0], "score_target": "very high"}]
    src = DataSource(str(write_jsonl(tmp_path / "bad.jsonl", bad)))
    with pytest.raises(ImportDataError, match=r"row 1: 'score_target': target 'very high'"):
        import_raw(src, SCALE, MAPPING, QUALIFIERS)
    with pytest.raises(ImportDataError, match="does not exist"):
        import_raw(DataSource(str(tmp_path / "nope.jsonl")), SCALE)


def pair_rows(conversational: bool) -> list[dict]:
    rows = []
    for t in range(10):
        task = f"Write a review of film number {t}."
        for system, good, bad in (
            ("Write plainly.", "plain", "ornate"),
            ("Write in a lavish rococo style.", "ornate", "plain"),
        ):
            if conversational:
                rows.append(
                    {
                        "prompt": [
                            {"role": "system", "content": system},
                            {"role": "user", "content": task},
                        ],
                        "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}],
                    }
                )
            else:
                rows.append({"system": system, "question": task, "chosen": good, "rejected": bad})
    return rows


def test_pairs_dataset_conversational_and_flat(tmp_path):
    conv = import_pairs(
        DataSource(str(write_jsonl(tmp_path / "conv.jsonl", pair_rows(True)))),
        test_fraction=0.3,
        seed=1,
    )
    pq.write_table(pa.Table.from_pylist(pair_rows(False)), tmp_path / "flat.parquet")
    flat = import_pairs(
        DataSource(str(tmp_path / "flat.parquet")),
        PairColumns(prompt="question", system="system"),
        test_fraction=0.3,
        seed=1,
    )
    assert conv == flat  # the same pairs, whichever shape they came in
    assert len(conv) == 20
    row = conv[1]
    assert row["prompt"] == [
        {"role": "system", "content": "Write in a lavish rococo style."},
        {"role": "user", "content": "Write a review of film number 0."},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "ornate"}]
    assert row["system_prompt"] == "Write in a lavish rococo style."
    # split by task: both directions of a task land in the same split; both splits occur
    by_task = {}
    for r in conv:
        by_task.setdefault(r["task_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_task.values())
    assert {r["split"] for r in conv} == {"train", "test"}


def test_pairs_dataset_trains_with_the_pairs_schema(tmp_path):
    from cpt.stages.pairs import SCHEMA

    rows = import_pairs(DataSource(str(write_jsonl(tmp_path / "p.jsonl", pair_rows(True)))))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)  # the train stage's input format
    assert table.num_rows == 20 and set(table.column("split").to_pylist()) == {"train"}


def test_pairs_without_a_system_prompt_are_refused(tmp_path):
    rows = [{"prompt": "Write a poem.", "chosen": "a", "rejected": "b"}]
    src = DataSource(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    with pytest.raises(ImportDataError, match="row 1: no system prompt"):
        import_pairs(src)


def test_released_pairs_feed_the_train_stage_without_generating(tmp_path):
    """pairs.source: the pairs stage imports the file; tasks/generate/... are not run."""
    from conftest import compose

    from cpt import store
    from cpt.pipeline import resolve, run_plan

    src = write_jsonl(tmp_path / "prefs.jsonl", pair_rows(True))
    cfg = compose(f"run_dir={tmp_path / 'run'}", "stage=pairs", f"pairs.source.path={src}")
    plan = resolve(cfg)
    assert plan.selected == ("pairs",) and plan["pairs"].needs == ()
    assert plan["train"].needs == ("pairs",)
    (out,) = run_plan(plan)
    table = store.read_table(out)
    assert table.num_rows == 20 and set(table.column("split").to_pylist()) <= {"train", "test"}
    assert store.read_json(out / "manifest.json")["imported_from"] == str(src)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["pairs"]


def test_raw_dataset_command_line(tmp_path):
    from cpt.importers import main

    src = write_jsonl(tmp_path / "raw.jsonl", raw_rows())
    args = [str(src), str(tmp_path / "out"), "--target", "score_target"]
    assert main([*args, "--response", "generation", "--model", "generator"]) == 0
    tasks = (tmp_path / "out" / "tasks.jsonl").read_text().splitlines()
    assert len(tasks) == 2 and json.loads(tasks[0]) == {"text": "Review the film Alien."}
    assert pq.read_table(tmp_path / "out" / "responses.parquet").num_rows == 13
