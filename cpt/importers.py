"""Importers for the paper's released data (Gallego 2025, github.com/vicgalle/configurable-preference-tuning):

* the raw dataset (hub: `vicgalle/creative-rubrics`): one row per teacher response with the
  prompt, the rubric, the target score (level) for that rubric, the response and the
  model that generated it -> tasks and generate-stage-like response rows;
* the preference-pairs dataset (hub: `vicgalle/creative-rubrics-preferences`): DPO rows
  (prompt, chosen, rejected; the system prompt either inside a conversational prompt or in
  a column of its own) -> rows in the pairs stage's format, split by task.

Both read a local JSONL or Parquet file, or a folder written by `datasets.save_to_disk`
(a `Dataset` or a `DatasetDict`, of which `split` is taken). Column names are configurable
(`RawColumns`, `PairColumns`), because the released files name them their own way; a
missing column fails with the columns that exist. No hub access is needed or attempted:
download once where the hub is reachable (`datasets.load_dataset(name).save_to_disk(dir)`)
and copy the folder.

    from cpt.importers import DataSource, import_pairs, import_raw
    tasks, responses = import_raw(DataSource("creative-rubrics/"), scale)
    rows = import_pairs(DataSource("prefs.parquet"), test_fraction=0.2, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt.levels import LevelScale
from cpt.store import content_hash
from cpt.tasks import Task, task_id


class ImportDataError(ValueError):
    """A released file cannot be read as configured; the message names the file and field."""


@dataclass
class DataSource:
    """Parameters:
    path (`str`): a .jsonl or .parquet file, or a `save_to_disk` folder.
    split (`str`, defaults to `"train"`): the split of a saved `DatasetDict`.
    limit (`int`, defaults to `0`): read only the first `limit` rows; 0 reads all.
    """

    path: str = ""
    split: str = "train"
    limit: int = 0


@dataclass
class RawColumns:
    """Column names of the raw dataset (one row per teacher response)."""

    prompt: str = "prompt"
    rubric: str = "rubric"
    target: str = "score"  # the target level (a name, or a 0-100 score binned by the scale)
    response: str = "response"
    model: str = "model"  # the generating (teacher) model; empty: not in the file
    rubric_name: str = ""  # a short rubric name column, if any (else named by a hash)


@dataclass
class PairColumns:
    """Column names of the preference-pairs dataset.

    `prompt` may hold the user text or a conversational list of messages (whose system
    turn is then the system prompt); `system` names a separate system-prompt column, if
    any; `chosen` / `rejected` hold text or assistant message lists.
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str = ""
    rubric: str = ""
    level_chosen: str = ""
    level_rejected: str = ""


@dataclass
class RawImport:
    tasks: list[Task]
    responses: list[dict[str, Any]]
    rubrics: dict[str, str] = field(default_factory=dict)  # rubric name -> its full text


def read_records(source: DataSource) -> list[dict[str, Any]]:
    """Rows of a local JSONL / Parquet file or `save_to_disk` folder, as dicts."""
    path = Path(source.path).expanduser()
    if not source.path or not path.exists():
        raise ImportDataError(
            f"import path: {source.path!r} does not exist (a .jsonl / .parquet file or a "
            "folder written by datasets' save_to_disk; the hub is not read)"
        )
    if path.is_dir():
        import datasets

        ds: Any = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise ImportDataError(
                    f"{path}: no split {source.split!r} (splits: {', '.join(ds)}); "
                    "set the import's split"
                )
            ds = ds[source.split]
        rows = (
            ds.to_list()
            if not source.limit
            else ds.select(range(min(source.limit, len(ds)))).to_list()
        )
        return rows
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ImportDataError(f"{path}:{i}: not JSON ({exc.msg})") from None
                if source.limit and len(rows) >= source.limit:
                    break
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return rows[: source.limit] if source.limit else rows
    raise ImportDataError(
        f"{path}: unknown file type (use .jsonl, .parquet or a save_to_disk folder)"
    )


def _require(rows: list[dict[str, Any]], columns: list[str], where: str, what: str) -> None:
    if not rows:
        raise ImportDataError(f"{where}: no rows")
    have = set(rows[0])
    missing = [c for c in columns if c and c not in have]
    if missing:
        raise ImportDataError(
            f"{where}: {what} column(s) {missing} not found (columns: {sorted(have)}); "
            "set the column mapping"
        )


def _level_lookup(scale: LevelScale, qualifiers: dict[str, str]) -> dict[str, str]:
    def norm(text: str) -> str:
        return re.sub(r"[\s_-]+", " ", text.strip().lower())

    lookup = {norm(n): n for n in scale.names}
    lookup.update({norm(q): n for n, q in qualifiers.items()})
    return lookup


def target_level(value: Any, scale: LevelScale, lookup: dict[str, str]) -> str:
    """A raw target -> a level name: a level name or qualifier (any case, spaces or
    underscores), or a 0-100 score binned by the scale."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return scale.bin(float(value))
    text = str(value)
    try:
        return scale.bin(float(text))
    except ValueError:
        pass
    name = lookup.get(re.sub(r"[\s_-]+", " ", text.strip().lower()))
    if name is None:
        raise ImportDataError(
            f"target {value!r} is neither a level ({', '.join(scale.names)}) nor a 0-100 score"
        )
    return name


def rubric_name(text: str) -> str:
    """A stable short name for a rubric given as free text: its first words + a hash."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:4]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return "-".join([*words, digest])


def import_raw(
    source: DataSource,
    scale: LevelScale,
    columns: RawColumns | None = None,
    qualifiers: dict[str, str] | None = None,
) -> RawImport:
    """The raw dataset -> tasks and response rows shaped like the generate stage's output.

    Response rows: id, task_id, rubric, level, sample_idx (0, 1, ... per (task, rubric,
    level) in file order), kind ("rubric"), text, ok, model (the generating model).
    """
    cols = columns or RawColumns()
    rows = read_records(source)
    where = f"raw dataset {source.path}"
    _require(
        rows,
        [cols.prompt, cols.rubric, cols.target, cols.response, cols.model, cols.rubric_name],
        where,
        "raw",
    )
    lookup = _level_lookup(scale, qualifiers or {})
    tasks: dict[str, Task] = {}
    rubrics: dict[str, str] = {}
    responses = []
    seen: dict[tuple[str, str, str], int] = {}
    for i, r in enumerate(rows, 1):
        prompt, rubric_text = r[cols.prompt], r[cols.rubric]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ImportDataError(f"{where}: row {i}: {cols.prompt!r} is empty or not text")
        name = str(r[cols.rubric_name]) if cols.rubric_name else rubric_name(str(rubric_text))
        rubrics.setdefault(name, str(rubric_text))
        try:
            level = target_level(r[cols.target], scale, lookup)
        except ImportDataError as exc:
            raise ImportDataError(f"{where}: row {i}: {cols.target!r}: {exc}") from None
        tid = task_id(prompt)
        tasks.setdefault(tid, Task(tid, prompt, f"raw:{source.path}"))
        key = (tid, name, level)
        sample = seen.get(key, 0)
        seen[key] = sample + 1
        text = r[cols.response]
        responses.append(
            {
                "id": content_hash(["import-raw", tid, name, level, sample]),
                "task_id": tid,
                "rubric": name,
                "level": level,
                "sample_idx": sample,
                "kind": "rubric",
                "text": text if isinstance(text, str) else "",
                "ok": isinstance(text, str) and bool(text.strip()),
                "model": str(r[cols.model]) if cols.model else "",
            }
        )
    return RawImport(list(tasks.values()), responses, rubrics)


def _messages(value: Any, role: str, where: str) -> list[dict[str, str]]:
    """Text or a message list -> a message list (text becomes one `role` turn)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in value]
    raise ImportDataError(
        f"{where}: expected text or a list of chat messages, got {type(value).__name__}"
    )


def _split_of(tid: str, test_fraction: float, seed: int) -> str:
    draw = int(content_hash(["split", seed, tid], 8), 16) / 16**8
    return "test" if draw < test_fraction else "train"


def import_pairs(
    source: DataSource,
    columns: PairColumns | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The preference-pairs dataset -> rows in the pairs stage's format.

    Keys: id, task_id, rubric, level_chosen, level_rejected, sample_idx, split,
    system_prompt, prompt ([system, user]), chosen, rejected ([assistant]). The task is
    the user turn; rows are split by task (seeded, `test_fraction` to test) so no task is
    in both splits. Rows without a system prompt are refused: CPT conditions on it.
    """
    cols = columns or PairColumns()
    rows = read_records(source)
    where = f"pairs dataset {source.path}"
    _require(
        rows,
        [
            cols.prompt,
            cols.chosen,
            cols.rejected,
            cols.system,
            cols.rubric,
            cols.level_chosen,
            cols.level_rejected,
        ],
        where,
        "pairs",
    )
    out = []
    counts: dict[str, int] = {}
    for i, r in enumerate(rows, 1):
        at = f"{where}: row {i}"
        prompt = _messages(r[cols.prompt], "user", f"{at}: {cols.prompt!r}")
        system = [m for m in prompt if m["role"] == "system"]
        users = [m for m in prompt if m["role"] == "user"]
        system_text = (
            str(r[cols.system]) if cols.system else (system[0]["content"] if system else "")
        )
        if not system_text.strip():
            raise ImportDataError(
                f"{at}: no system prompt (neither a system turn in {cols.prompt!r} nor a "
                "system column); set the mapping's system column"
            )
        if not users:
            raise ImportDataError(f"{at}: {cols.prompt!r} has no user turn")
        user = users[-1]["content"]
        tid = task_id(user)
        chosen = [
            m
            for m in _messages(r[cols.chosen], "assistant", f"{at}: {cols.chosen!r}")
            if m["role"] == "assistant"
        ]
        rejected = [
            m
            for m in _messages(r[cols.rejected], "assistant", f"{at}: {cols.rejected!r}")
            if m["role"] == "assistant"
        ]
        if not chosen or not rejected:
            raise ImportDataError(f"{at}: chosen and rejected need an assistant turn each")
        sample = counts.get(tid, 0)
        counts[tid] = sample + 1
        out.append(
            {
                "id": content_hash(["import-pair", tid, system_text, sample]),
                "task_id": tid,
                "rubric": str(r[cols.rubric]) if cols.rubric else "",
                "level_chosen": str(r[cols.level_chosen]) if cols.level_chosen else "",
                "level_rejected": str(r[cols.level_rejected]) if cols.level_rejected else "",
                "sample_idx": sample,
                "split": _split_of(tid, test_fraction, seed),
                "system_prompt": system_text,
                "prompt": [
                    {"role": "system", "content": system_text},
                    {"role": "user", "content": user},
                ],
                "chosen": chosen[-1:],
                "rejected": rejected[-1:],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m cpt.importers <raw dataset> <out dir> [--prompt col ...]`: the raw dataset
    as `tasks.jsonl` (a task source: `tasks.sources=[{kind: jsonl, path: <out>/tasks.jsonl}]`),
    `responses.parquet` (the teacher responses, generate-stage columns) and `rubrics.json`."""
    import argparse

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpt.levels import LevelScale as Scale

    parser = argparse.ArgumentParser(prog="python -m cpt.importers", description=main.__doc__)
    parser.add_argument("path", help="a .jsonl / .parquet file or a save_to_disk folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--split", default="train")
    for name, default in vars(RawColumns()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, help="column name")
    args = parser.parse_args(argv)
    cols = RawColumns(**{k: getattr(args, k) for k in vars(RawColumns())})
    scale = Scale(("low", "moderate", "extremely_high"), (40.0, 92.5, 100.0))  # the paper's
    got = import_raw(
        DataSource(args.path, args.split), scale, cols, {"extremely_high": "extremely high"}
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks.jsonl").write_text(
        "".join(json.dumps({"text": t.text}, ensure_ascii=False) + "\n" for t in got.tasks)
    )
    pq.write_table(pa.Table.from_pylist(got.responses), out / "responses.parquet")
    (out / "rubrics.json").write_text(json.dumps(got.rubrics, ensure_ascii=False, indent=1))
    print(
        f"{len(got.tasks)} tasks, {len(got.responses)} responses, {len(got.rubrics)} rubrics -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
