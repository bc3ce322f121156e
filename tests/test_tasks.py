"""cpt.tasks: ids, sources, sampling, errors, and the shipped task list. Offline and fast."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt.tasks import (
    GENRES,
    SHIPPED_PATH,
    Task,
    TaskError,
    TaskSource,
    load_source,
    load_tasks,
    task_id,
    validate_task_files,
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- ids


def test_task_id_is_pinned():
    # Pinned so the hash (and every stored task_id downstream) can never change silently.
    assert task_id("Write a poem about the sea.") == "t-f68aee707ba0a23f"


def test_task_id_collapses_whitespace_but_keeps_case():
    base = task_id("Write a poem about the sea.")
    assert task_id("  Write a  poem\nabout\tthe sea.  ") == base
    assert task_id("write a poem about the sea.") != base
    assert task_id("Write a poem about the sea!") != base
    assert base.startswith("t-") and len(base) == 18


# ----------------------------------------------------------------------------- sources


def test_jsonl_source_with_genre_column(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": " Tell a story. ", "kind": "story"},
            {"prompt": "Describe a cave.", "kind": None},
        ],
    )
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are skipped
    src = TaskSource(
        kind="jsonl", path=str(path), text_column="prompt", genre_column="kind", genre="description"
    )
    tasks = load_source(src)
    assert tasks == [
        Task(task_id("Tell a story."), "Tell a story.", f"jsonl:{path}", "story"),
        Task(task_id("Describe a cave."), "Describe a cave.", f"jsonl:{path}", "description"),
    ]


def test_csv_source_maps_columns_and_handles_multiline_cells(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,prompt,g\n1,"Write a poem,\nin two lines.",poem\n2,Explain tides.,\n')
    src = TaskSource(kind="csv", path=str(path), text_column="prompt", genre_column="g")
    tasks = load_source(src)
    assert [(t.text, t.genre, t.source) for t in tasks] == [
        ("Write a poem,\nin two lines.", "poem", f"csv:{path}"),
        ("Explain tides.", "", f"csv:{path}"),
    ]


def test_parquet_source(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"q": ["A.", "B.", "C."], "genre": ["essay", "poem", "story"]}), path)
    src = TaskSource(kind="parquet", path=str(path), text_column="q", genre_column="genre", limit=2)
    assert [(t.text, t.genre) for t in load_source(src)] == [("A.", "essay"), ("B.", "poem")]


def test_hf_source_from_local_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"instruction": ["One.", "Two."], "cat": ["story", "poem"]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))

    single = TaskSource(
        kind="hf", name=str(tmp_path / "single"), text_column="instruction", genre_column="cat"
    )
    tasks = load_source(single)
    assert [(t.text, t.genre) for t in tasks] == [("One.", "story"), ("Two.", "poem")]
    assert tasks[0].source == f"hf:{tmp_path / 'single'}:train"

    test = TaskSource(
        kind="hf", name=str(tmp_path / "dd"), split="test", text_column="instruction", genre="poem"
    )
    assert [(t.text, t.genre) for t in load_source(test)] == [("Two.", "poem")]

    with pytest.raises(TaskError, match=r"no split 'dev' \(splits: train, test\)"):
        load_source(TaskSource(kind="hf", name=str(tmp_path / "dd"), split="dev"))
    with pytest.raises(TaskError, match=r"no column 'text' \(columns: instruction, cat\)"):
        load_source(TaskSource(kind="hf", name=str(tmp_path / "single")))


def test_shipped_source_has_300_unique_tasks_covering_every_genre():
    tasks = load_source(TaskSource())
    assert len(tasks) >= 300
    assert len({t.task_id for t in tasks}) == len(tasks)
    assert {t.genre for t in tasks} == set(GENRES)
    assert all(t.source == "shipped" for t in tasks)
    assert validate_task_files([SHIPPED_PATH], genres=GENRES) == []


# ----------------------------------------------------------------------------- dedup, sampling


def test_load_tasks_dedups_first_source_wins_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "X."}, {"text": "Y."}, {"text": "X. "}])
    b = tmp_path / "b.csv"
    b.write_text("text\nZ.\nY.\n")
    tasks = load_tasks(
        [TaskSource(kind="jsonl", path=str(a), genre="story"), TaskSource(kind="csv", path=str(b))]
    )
    assert [(t.text, t.genre, t.source.split(":")[0]) for t in tasks] == [
        ("X.", "story", "jsonl"),
        ("Y.", "story", "jsonl"),
        ("Z.", "", "csv"),
    ]


def test_sampling_is_seeded_sorted_and_independent_of_source_order(tmp_path):
    rows = [{"text": f"Task number {i}."} for i in range(50)]
    fwd = write_jsonl(tmp_path / "fwd.jsonl", rows)
    rev = write_jsonl(tmp_path / "rev.jsonl", rows[::-1])
    draw = load_tasks([TaskSource(kind="jsonl", path=str(fwd))], num_tasks=10, seed=3)
    assert len(draw) == 10
    assert [t.task_id for t in draw] == sorted(t.task_id for t in draw)
    again = load_tasks([TaskSource(kind="jsonl", path=str(fwd))], num_tasks=10, seed=3)
    assert again == draw
    reordered = load_tasks([TaskSource(kind="jsonl", path=str(rev))], num_tasks=10, seed=3)
    assert [t.text for t in reordered] == [t.text for t in draw]
    other = load_tasks([TaskSource(kind="jsonl", path=str(fwd))], num_tasks=10, seed=4)
    assert {t.task_id for t in other} != {t.task_id for t in draw}


def test_num_tasks_over_available_names_both_counts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A."}, {"text": "B."}, {"text": "A."}])
    with pytest.raises(TaskError, match=r"num_tasks=5 but the sources hold only 2 unique tasks"):
        load_tasks([TaskSource(kind="jsonl", path=str(path))], num_tasks=5)
    with pytest.raises(TaskError, match="no task sources"):
        load_tasks([])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sql"}, r"kind must be one of shipped, jsonl, csv, parquet, hf, got 'sql'"),
        ({"kind": "csv"}, r"TaskSource.path is required for kind=csv"),
        ({"kind": "hf"}, r"TaskSource.name is required for kind=hf"),
        ({"text_column": ""}, r"text_column must not be empty"),
        ({"limit": -1}, r"limit must be >= 0"),
    ],
)
def test_task_source_validates_fields(kwargs, match):
    with pytest.raises(TaskError, match=match):
        TaskSource(**kwargs)


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [
        json.dumps({"text": "Good."}),
        json.dumps({"prompt": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": "   "}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "x" * 30}),
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(TaskError) as err:
        load_source(TaskSource(kind="jsonl", path=str(path)), max_chars=20)
    msg = str(err.value)
    assert f"{path}: 7 problems:" in msg
    for expected in [
        f"{path}:2: missing field 'text'",
        f"{path}:3: field 'text' must be a string, got int",
        f"{path}:4: empty text in field 'text'",
        f"{path}:5: invalid JSON (",
        f"{path}:6: expected a JSON object, got list",
        f"{path}:7: field 'text' is 30 characters, over max_chars=20",
        f"{path}:8: not valid UTF-8",
    ]:
        assert expected in msg


def test_jsonl_missing_genre_field_and_bad_genre_type(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "A."}, {"text": "B.", "genre": 3}])
    with pytest.raises(TaskError) as err:
        load_source(TaskSource(kind="jsonl", path=str(path), genre_column="genre"))
    assert f"{path}:1: missing field 'genre'" in str(err.value)
    assert f"{path}:2: field 'genre' must be a string, got int" in str(err.value)


def test_csv_errors_name_file_row_and_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(TaskError, match=r"bad\.csv: no column 'prompt' \(columns: a, b\)"):
        load_source(TaskSource(kind="csv", path=str(bad), text_column="prompt"))

    rows = tmp_path / "rows.csv"
    rows.write_text('text\nfine\n""\none,two\n')
    with pytest.raises(TaskError) as err:
        load_source(TaskSource(kind="csv", path=str(rows)))
    assert f"{rows}: row 2 (line 3): empty text in column 'text'" in str(err.value)
    assert f"{rows}: row 3 (line 4): more cells than header columns" in str(err.value)

    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(TaskError, match=r"latin\.csv: not valid UTF-8"):
        load_source(TaskSource(kind="csv", path=str(latin)))


def test_parquet_errors(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["ok", None, ""]}), path)
    with pytest.raises(TaskError) as err:
        load_source(TaskSource(kind="parquet", path=str(path)))
    assert f"{path}: row index 1: column 'text' must be a string, got NoneType" in str(err.value)
    assert f"{path}: row index 2: empty text in column 'text'" in str(err.value)

    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("text\nhello\n")
    with pytest.raises(TaskError, match=r"fake\.parquet: not a readable Parquet file"):
        load_source(TaskSource(kind="parquet", path=str(not_parquet)))


def test_empty_and_missing_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskError, match=r"empty\.jsonl: no tasks"):
        load_source(TaskSource(kind="jsonl", path=str(empty)))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text\n")
    with pytest.raises(TaskError, match=r"header\.csv: no tasks"):
        load_source(TaskSource(kind="csv", path=str(header_only)))
    with pytest.raises(TaskError, match=r"nope\.jsonl: no such file"):
        load_source(TaskSource(kind="jsonl", path=str(tmp_path / "nope.jsonl")))


def test_validate_task_files_reports_every_problem_in_one_pass(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "Same.", "genre": "poem"}, {"genre": "poem"}])
    b = tmp_path / "b.csv"
    b.write_text("text,genre\nSame.,poem\nOther.,limerick\n")
    empty = tmp_path / "c.jsonl"
    empty.write_text("")
    (tmp_path / "notes.txt").write_text("ignored: not a task file type")
    problems = validate_task_files([tmp_path], genres=GENRES)
    assert problems == [
        f"{a}:2: missing field 'text'",
        f"{b}: row 1 (line 2): duplicate task (same text as {a}:1)",
        f"{b}: row 2 (line 3): genre 'limerick' is not one of: {', '.join(sorted(GENRES))}",
        f"{empty}: no tasks (the file is empty); expected at least one row",
    ]
    assert validate_task_files([a, tmp_path / "x.txt"])[-1].endswith(
        "unknown task file type; expected .jsonl, .csv or .parquet"
    )
