"""Task sources: the user requests (the `x` of the method) that teachers answer under each rubric.

A task is one creative-writing or open-ended request. Tasks come from the shipped list
(`rubrics/tasks/shipped.jsonl`), local JSONL / CSV / Parquet files, or a Hugging Face dataset
(a hub name or a local folder written by `datasets.Dataset.save_to_disk`). Every task gets a
content-hash id, so the same text read from two sources is one task and ids stay stable across
runs, machines and file orderings.

    from cpt.tasks import TaskSource, load_tasks
    tasks = load_tasks([TaskSource(), TaskSource(kind="csv", path="mine.csv", text_column="prompt")],
                       num_tasks=100, seed=0)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE_KINDS = ("shipped", "jsonl", "csv", "parquet", "hf")
GENRES = (
    "story",
    "poem",
    "review",
    "essay",
    "letter",
    "dialogue",
    "description",
    "explanation",
    "support",
    "lesson",
    "speech",
    "advertisement",
)  # the vocabulary of the shipped list; rubrics name these in their task tags
MAX_CHARS = 20_000  # a task is a request, not a document; longer is likely the wrong column
SHIPPED_PATH = Path(__file__).resolve().parents[1] / "rubrics" / "tasks" / "shipped.jsonl"
_FILE_KINDS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_MAX_LISTED = 20  # problems quoted in one TaskError; the rest are counted


class TaskError(ValueError):
    """A task source is misconfigured or a task file is malformed; the message names where."""


@dataclass(frozen=True)
class Task:
    """One request. `task_id` is `task_id(text)`; `source` says where it was read (`shipped`,
    `jsonl:<path>`, `hf:<name>:<split>`, ...); `genre` is empty when the source gives none."""

    task_id: str
    text: str
    source: str
    genre: str = ""


def task_id(text: str) -> str:
    """Stable id of a task text: `t-` + the first 16 hex chars of the sha256 of the text with
    whitespace runs collapsed to one space and the ends stripped. Case is kept: `Tell` and
    `tell` are different tasks."""
    normalized = " ".join(text.split())
    return "t-" + hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:16]


@dataclass
class TaskSource:
    """Where to read tasks from (a Hydra structured-config node: plain field types only).

    Parameters:
        kind (`str`, defaults to `"shipped"`): one of shipped, jsonl, csv, parquet, hf.
        path (`str`, defaults to `""`): the file, for jsonl / csv / parquet (relative to the working
            directory). For shipped, empty means the project's `rubrics/tasks/shipped.jsonl`.
        name (`str`, defaults to `""`): for hf, a hub dataset name, or a local folder written by
            `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (tried first).
        split (`str`, defaults to `"train"`): for hf, the split to read.
        text_column (`str`, defaults to `"text"`): JSON field / column holding the request.
        genre_column (`str`, defaults to `""`): field / column holding each task's genre; empty
            means none (for shipped it is always `genre`). A null or empty value falls back to `genre`.
        genre (`str`, defaults to `""`): a fixed genre for every task of this source that has none.
        limit (`int`, defaults to `0`): read only the first `limit` tasks of the source; 0 reads all.

    Raises:
        TaskError: if `kind` is unknown, a field that `kind` needs is empty, or `limit` < 0.
    """

    kind: str = "shipped"
    path: str = ""
    name: str = ""
    split: str = "train"
    text_column: str = "text"
    genre_column: str = ""
    genre: str = ""
    limit: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise TaskError(
                f"TaskSource.kind must be one of {', '.join(SOURCE_KINDS)}, got {self.kind!r}"
            )
        if self.kind in ("jsonl", "csv", "parquet") and not self.path:
            raise TaskError(f"TaskSource.path is required for kind={self.kind} (the task file)")
        if self.kind == "hf":
            if not self.name:
                raise TaskError(
                    "TaskSource.name is required for kind=hf "
                    "(a hub dataset name or a folder written by save_to_disk)"
                )
            if not self.split:
                raise TaskError("TaskSource.split is required for kind=hf (e.g. 'train')")
        if not self.text_column:
            raise TaskError("TaskSource.text_column must not be empty (e.g. 'text')")
        if self.limit < 0:
            raise TaskError(f"TaskSource.limit must be >= 0 (0 reads all), got {self.limit}")


@dataclass(frozen=True)
class _Columns:
    """How to read rows of one file: which columns, and whether a missing genre is a problem."""

    text: str
    genre: str  # "" = no genre column
    genre_optional: bool  # validation mode: a row without the genre field is fine
    fixed_genre: str
    max_chars: int


def load_source(src: TaskSource, max_chars: int = MAX_CHARS) -> list[Task]:
    """Read every task of one source, in source order (no dedup; see `load_tasks`).

    Raises:
        TaskError: listing every problem found in the source (file:line and field for jsonl, row
            for csv/parquet/hf): missing or non-string or empty text, text over `max_chars`,
            invalid JSON or UTF-8, an unknown column, or a source with zero tasks.
    """
    genre_column = src.genre_column or ("genre" if src.kind == "shipped" else "")
    cols = _Columns(src.text_column, genre_column, False, src.genre, max_chars)
    limit = src.limit or None
    if src.kind == "hf":
        where, source = f"hf dataset '{src.name}' split '{src.split}'", f"hf:{src.name}:{src.split}"
        rows = _hf_rows(src, cols)
    else:
        path = Path(src.path) if src.path else SHIPPED_PATH
        where, source = str(path), "shipped" if src.kind == "shipped" else f"{src.kind}:{src.path}"
        kind = "jsonl" if src.kind == "shipped" else src.kind
        rows = _file_rows(path, kind, cols, limit)
    problems: list[str] = []
    tasks: list[Task] = []
    for _, text, genre, problem in rows:
        if problem:
            problems.append(problem)
        else:
            tasks.append(Task(task_id(text), text, source, genre))
        if limit is not None and len(tasks) + len(problems) >= limit:
            break
    if problems:
        raise TaskError(_summarize(where, problems))
    if not tasks:
        raise TaskError(f"{where}: no tasks (the source is empty); expected at least one row")
    return tasks


def load_tasks(
    sources: Sequence[TaskSource], num_tasks: int = 0, seed: int = 0, max_chars: int = MAX_CHARS
) -> list[Task]:
    """Load all sources, drop repeated texts (by `task_id`; the first source wins, order kept),
    then, if `num_tasks` > 0, draw `num_tasks` of them with `random.Random(seed)` and return
    the draw sorted by task_id. The draw depends only on the set of tasks and the seed, not on
    the order the sources list them in.

    Raises:
        TaskError: from `load_source`; if no sources are given; if `num_tasks` is negative or
            more than the unique tasks available.
    """
    if not sources:
        raise TaskError("no task sources given; add at least one TaskSource (e.g. kind=shipped)")
    if num_tasks < 0:
        raise TaskError(f"num_tasks must be >= 0 (0 keeps all), got {num_tasks}")
    seen: set[str] = set()
    tasks: list[Task] = []
    for src in sources:
        for task in load_source(src, max_chars=max_chars):
            if task.task_id not in seen:
                seen.add(task.task_id)
                tasks.append(task)
    if num_tasks == 0:
        return tasks
    if num_tasks > len(tasks):
        raise TaskError(
            f"num_tasks={num_tasks} but the sources hold only {len(tasks)} unique tasks; "
            f"lower num_tasks or add sources"
        )
    pool = sorted(tasks, key=lambda t: t.task_id)
    return sorted(random.Random(seed).sample(pool, num_tasks), key=lambda t: t.task_id)


def validate_task_files(
    paths: Iterable[str | Path],
    text_column: str = "text",
    genre_column: str = "genre",
    genres: Sequence[str] | None = None,
    max_chars: int = MAX_CHARS,
) -> list[str]:
    """Every problem in the given task files (`.jsonl`, `.csv`, `.parquet`; a folder means the
    task files in it), in one pass, for a check command. Beyond what loading rejects, this also
    reports texts repeated within or across the files and, when `genres` is given, genres not in
    it. A missing genre field is fine here; a genre that is present must be a string. Returns
    [] when all files are clean."""
    files: list[Path] = []
    problems: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in _FILE_KINDS)
            if not found:
                problems.append(f"{p}: no task files (*.jsonl, *.csv, *.parquet) in this folder")
            files.extend(found)
        else:
            files.append(p)
    cols = _Columns(text_column, genre_column, True, "", max_chars)
    first_seen: dict[str, str] = {}
    allowed = set(genres) if genres is not None else None
    for path in files:
        kind = _FILE_KINDS.get(path.suffix)
        if kind is None:
            problems.append(f"{path}: unknown task file type; expected .jsonl, .csv or .parquet")
            continue
        n_good = n_bad = 0
        for where, text, genre, problem in _file_rows(path, kind, cols, None):
            if problem:
                problems.append(problem)
                n_bad += 1
                continue
            n_good += 1
            tid = task_id(text)
            if tid in first_seen:
                problems.append(f"{where}: duplicate task (same text as {first_seen[tid]})")
            else:
                first_seen[tid] = where
            if allowed is not None and genre not in allowed:
                problems.append(
                    f"{where}: genre {genre!r} is not one of: {', '.join(sorted(allowed))}"
                )
        if n_good == n_bad == 0:
            problems.append(f"{path}: no tasks (the file is empty); expected at least one row")
    return problems


# ----------------------------------------------------------------------------- readers
# Each reader yields (where, text, genre, problem) per row; problem is "" for a good row. Readers
# keep going after a bad row, so one pass finds every problem; a file-level problem ends the file.

_Row = tuple[str, str, str, str]


def _file_rows(path: Path, kind: str, cols: _Columns, limit: int | None) -> Iterator[_Row]:
    if not path.is_file():
        hint = (
            " (kind=shipped with empty path uses the packaged list)" if path == SHIPPED_PATH else ""
        )
        yield str(path), "", "", f"{path}: no such file{hint}"
        return
    if kind == "jsonl":
        yield from _jsonl_rows(path, cols)
    elif kind == "csv":
        yield from _csv_rows(path, cols)
    else:
        yield from _parquet_rows(path, cols, limit)


def _jsonl_rows(path: Path, cols: _Columns) -> Iterator[_Row]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield str(path), "", "", f"{where}: not valid UTF-8 (byte {e.start} of the line)"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield str(path), "", "", f"{where}: invalid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(obj, dict):
                yield (
                    str(path),
                    "",
                    "",
                    f"{where}: expected a JSON object, got {type(obj).__name__}",
                )
                continue
            yield _check_row(where, "field", obj, cols)


def _csv_rows(path: Path, cols: _Columns) -> Iterator[_Row]:
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield str(path), "", "", f"{path}: not valid UTF-8 (byte {e.start} of the file)"
        return
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        yield str(path), "", "", f"{path}: not a readable CSV header ({e})"
        return
    missing = _missing_columns(header, cols)
    if missing:
        yield str(path), "", "", f"{path}: {missing}"
        return
    row_no, line = 0, reader.line_num + 1
    try:
        for row in reader:
            row_no += 1
            if None in row:  # DictReader puts extra cells under the key None
                yield (
                    str(path),
                    "",
                    "",
                    f"{path}: row {row_no} (line {line}): more cells than header columns",
                )
            else:
                yield _check_row(f"{path}: row {row_no} (line {line})", "column", row, cols)
            line = reader.line_num + 1
    except csv.Error as e:
        yield str(path), "", "", f"{path}: row {row_no + 1} (line {line}): malformed CSV ({e})"


def _parquet_rows(path: Path, cols: _Columns, limit: int | None) -> Iterator[_Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for non-Parquet files
        yield str(path), "", "", f"{path}: not a readable Parquet file ({e})"
        return
    header = pf.schema_arrow.names
    missing = _missing_columns(header, cols)
    if missing:
        yield str(path), "", "", f"{path}: {missing}"
        return
    wanted = [c for c in (cols.text, cols.genre) if c and c in header]
    table = pf.read(columns=wanted)
    if limit is not None:
        table = table.slice(0, limit)
    yield from _table_rows(str(path), table.to_pydict(), table.num_rows, cols)


def _hf_rows(src: TaskSource, cols: _Columns) -> Iterator[_Row]:
    import datasets

    where = f"hf dataset '{src.name}'"
    try:
        if Path(src.name).is_dir():
            ds: Any = datasets.load_from_disk(src.name)
            if isinstance(ds, datasets.DatasetDict):
                if src.split not in ds:
                    yield (
                        where,
                        "",
                        "",
                        f"{where}: no split '{src.split}' (splits: {', '.join(ds)})",
                    )
                    return
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.name, split=src.split)
    except Exception as e:  # offline hub, unknown name, bad split: all surface as one TaskError
        yield (
            where,
            "",
            "",
            f"{where}: could not load split '{src.split}' ({type(e).__name__}: {e})",
        )
        return
    header = list(ds.column_names)
    missing = _missing_columns(header, cols)
    if missing:
        yield where, "", "", f"{where}: {missing}"
        return
    if src.limit:
        ds = ds.select(range(min(src.limit, len(ds))))
    data = {c: ds[c] for c in (cols.text, cols.genre) if c}
    yield from _table_rows(f"{where} split '{src.split}'", data, len(ds), cols)


def _table_rows(where: str, data: dict[str, list[Any]], n: int, cols: _Columns) -> Iterator[_Row]:
    names = list(data)
    for i in range(n):
        row = {c: data[c][i] for c in names}
        yield _check_row(f"{where}: row index {i}", "column", row, cols)


def _missing_columns(header: Sequence[str], cols: _Columns) -> str:
    for col in (cols.text, cols.genre):
        if col and col not in header and not (col == cols.genre and cols.genre_optional):
            return f"no column '{col}' (columns: {', '.join(header)})"
    return ""


def _check_row(where: str, what: str, row: dict[str, Any], cols: _Columns) -> _Row:
    """Validate one row; `what` is "field" (JSON) or "column" (tables) for the message."""
    if cols.text not in row:
        return where, "", "", f"{where}: missing {what} '{cols.text}'"
    text = row[cols.text]
    if not isinstance(text, str):
        return (
            where,
            "",
            "",
            f"{where}: {what} '{cols.text}' must be a string, got {type(text).__name__}",
        )
    text = text.strip()
    if not text:
        return where, "", "", f"{where}: empty text in {what} '{cols.text}'"
    if len(text) > cols.max_chars:
        return (
            where,
            "",
            "",
            (
                f"{where}: {what} '{cols.text}' is {len(text)} characters, over max_chars={cols.max_chars}"
            ),
        )
    genre = cols.fixed_genre
    if cols.genre:
        if cols.genre not in row and not cols.genre_optional:
            return where, "", "", f"{where}: missing {what} '{cols.genre}'"
        value = row.get(cols.genre)
        if value is not None and not isinstance(value, str):
            return (
                where,
                "",
                "",
                (f"{where}: {what} '{cols.genre}' must be a string, got {type(value).__name__}"),
            )
        genre = (value or "").strip() or genre
    return where, text, genre, ""


def _summarize(where: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{where}: {len(problems)} problems:\n  {shown}{more}"


def split_tasks(tasks: list[Task], test_fraction: float, seed: int) -> dict[str, str]:
    """task_id -> "train" | "test": a seeded, order-independent split by task."""
    from cpt.store import content_hash

    order = sorted(tasks, key=lambda t: content_hash([seed, t.task_id]))
    n_test = round(len(tasks) * test_fraction)
    if len(tasks) >= 2:
        n_test = min(max(n_test, 1), len(tasks) - 1)  # both splits non-empty
    return {t.task_id: ("test" if i < n_test else "train") for i, t in enumerate(order)}
