"""Rubrics: weighted criteria, each with a descriptor for five levels (the `R` of the method).

One rubric per YAML file; the file stem is the rubric name. Loading validates everything and
reports every problem of a file at once, each line naming file, rubric and field:

    from cpt.rubric import load_rubrics, validate_paths
    rubrics = load_rubrics("rubrics")           # a folder (its *.yaml / *.yml) or one file
    table = rubrics[0].to_markdown()            # what teacher and judge prompts embed
    problems = validate_paths(["rubrics", "extra/my-style.yaml"])   # stage=check: [] if all good

File format (`task_tags` is optional; empty or absent means "every task"):

    name: baroque-reviewer
    description: One or two sentences on the style this rubric measures.
    task_tags: [review]
    criteria:
      - name: Ornamentation
        weight: 30            # weights of a rubric sum to 100
        levels: {excellent: ..., good: ..., fair: ..., poor: ..., unsatisfactory: ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpt.tasks import GENRES

LEVEL_KEYS = ("excellent", "good", "fair", "poor", "unsatisfactory")  # best first
LEVEL_NAMES = {key: key.capitalize() for key in LEVEL_KEYS}  # display names: "Excellent", ...
TASK_TAGS = (
    GENRES  # the genres a rubric may restrict itself to (the shipped task list's vocabulary)
)
WEIGHT_TOTAL = 100  # weights are percentages
MAX_TEXT_CHARS = 4000  # any one string; a descriptor is a sentence or two, not a document
MAX_FILE_BYTES = 1_000_000  # refuse to parse anything this big: it cannot be a rubric
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
RUBRIC_KEYS = ("name", "description", "criteria", "task_tags")
REQUIRED_KEYS = ("name", "description", "criteria")
CRITERION_KEYS = ("name", "weight", "levels")
YAML_SUFFIXES = (".yaml", ".yml")
_PathLike = str | os.PathLike[str]


class RubricError(ValueError):
    """A rubric file is unreadable or invalid. `problems` holds one line per problem, each naming
    the file, the rubric and the field; the message is those lines joined by newlines."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Criterion:
    """One weighted criterion. `weight` is a percentage (1-100); `levels` maps each of
    `LEVEL_KEYS`, in that order, to the descriptor a judge reads for that level."""

    name: str
    weight: int
    levels: dict[str, str]


@dataclass(frozen=True)
class Rubric:
    """A validated rubric. Criteria keep file order and their weights sum to 100. `task_tags`
    lists the task genres (from `TASK_TAGS`) the rubric applies to; empty means all tasks."""

    name: str
    description: str
    criteria: tuple[Criterion, ...]
    task_tags: tuple[str, ...] = ()

    def to_markdown(self) -> str:
        """The rubric as one Markdown table: a row per criterion, weight as `30%`, then one
        column per level. Pipes and line breaks inside text are escaped so the table holds."""
        header = ["Criterion", "Weight", *(LEVEL_NAMES[k] for k in LEVEL_KEYS)]
        lines = [_row(header), _row(["---"] * len(header))]
        for c in self.criteria:
            cells = [_cell(c.name), f"{c.weight}%", *(_cell(c.levels[k]) for k in LEVEL_KEYS)]
            lines.append(_row(cells))
        return "\n".join(lines)

    def content_hash(self) -> str:
        """A stable id for exactly this content: sha256 of canonical JSON, first 16 hex chars.
        Changing any word, weight or tag changes it; file name, comments and layout do not."""
        canonical = json.dumps(
            dataclasses.asdict(self), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_rubric(path: _PathLike) -> Rubric:
    """Load and validate one rubric file.

    Raises:
        RubricError: the file is missing, not UTF-8, not YAML, not a mapping, or breaks any rule;
            every problem of the file is listed, one per line.
    """
    file = Path(path)
    if file.is_dir():
        raise RubricError(f"{file}: is a folder; load_rubric reads one file (use load_rubrics)")
    rubric, problems = _load_file(file)
    if problems:
        raise RubricError(problems)
    assert rubric is not None
    return rubric


def load_rubrics(path: _PathLike) -> list[Rubric]:
    """Load one rubric file, or every `*.yaml` / `*.yml` file directly inside a folder (sorted by
    file name; subfolders such as `tasks/` are not read).

    Raises:
        RubricError: listing every problem in every file, plus rubric names used twice and a
            path that does not exist or holds no rubric files.
    """
    rubrics, problems = _load_paths([path])
    if problems:
        raise RubricError(problems)
    return rubrics


def validate_paths(paths: _PathLike | Iterable[_PathLike]) -> list[str]:
    """Check every rubric file under the given files and folders in one pass and return all
    problems (one line each, naming file, rubric and field); an empty list means all valid."""
    listed = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    return _load_paths(listed)[1]


def _load_paths(paths: Sequence[_PathLike]) -> tuple[list[Rubric], list[str]]:
    rubrics: list[Rubric] = []
    problems: list[str] = []
    seen_files: set[Path] = set()
    first_file: dict[str, Path] = {}  # rubric name -> the file that defined it first
    for raw in paths:
        for file, problem in _rubric_files(Path(raw)):
            if problem:
                problems.append(problem)
                continue
            if file.resolve() in seen_files:  # same folder named twice is not a duplicate rubric
                continue
            seen_files.add(file.resolve())
            rubric, file_problems = _load_file(file)
            problems.extend(file_problems)
            if rubric is None:
                continue
            if rubric.name in first_file:
                problems.append(
                    f"{file}: rubric '{rubric.name}': name: already defined in "
                    f"{first_file[rubric.name]} (rubric names must be unique; rename one)"
                )
                continue
            first_file[rubric.name] = file
            rubrics.append(rubric)
    return rubrics, problems


def _rubric_files(path: Path) -> list[tuple[Path, str]]:
    """(file, "") for each rubric file at `path`, or one (path, problem) if there are none."""
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in YAML_SUFFIXES
        )
        if not files:
            return [(path, f"{path}: no rubric files (*.yaml, *.yml) directly in this folder")]
        return [(f, "") for f in files]
    if path.is_file():
        return [(path, "")]
    return [(path, f"{path}: does not exist (expected a rubric YAML file or a folder of them)")]


def _load_file(path: Path) -> tuple[Rubric | None, list[str]]:
    """Parse and validate one file; returns (rubric, []) or (None, problems)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, [f"{path}: file is {size} bytes, limit is {MAX_FILE_BYTES} for a rubric"]
        data = path.read_bytes()
    except OSError as e:
        return None, [f"{path}: cannot read ({e.strerror or e})"]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [
            f"{path}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ]
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        return None, [f"{path}: not valid YAML{where}: {reason}"]
    if not isinstance(doc, dict):
        found = "an empty file" if doc is None else f"a {_type_name(doc)}"
        return None, [
            f"{path}: expected a YAML mapping with keys {', '.join(REQUIRED_KEYS)} "
            f"(task_tags optional), got {found}"
        ]
    return _build(path, doc)


class _Checker:
    """Collects the problems of one file, each prefixed with file and rubric."""

    def __init__(self, path: Path, label: str) -> None:
        self.prefix = f"{path}: rubric '{label}'"
        self.problems: list[str] = []

    def bad(self, field: str, message: str) -> None:
        self.problems.append(f"{self.prefix}: {field}: {message}")

    def text(self, raw: Any, field: str) -> str | None:
        """A non-empty string within the size limit, stripped; otherwise report and return None."""
        if not isinstance(raw, str):
            self.bad(field, f"expected a non-empty string, got {_describe(raw)}")
            return None
        text = raw.strip()
        if not text:
            self.bad(field, "is empty (expected a non-empty string)")
            return None
        if len(text) > MAX_TEXT_CHARS:
            self.bad(field, f"is {len(text)} characters long, limit is {MAX_TEXT_CHARS}")
            return None
        return text


def _build(path: Path, doc: dict[Any, Any]) -> tuple[Rubric | None, list[str]]:
    """Validate a parsed document against every rule, collecting all problems."""
    raw_name = doc.get("name")
    label = raw_name.strip() if isinstance(raw_name, str) and raw_name.strip() else path.stem
    check = _Checker(path, label)

    for key in doc:
        if key not in RUBRIC_KEYS:
            check.bad(str(key), f"unknown key (allowed: {', '.join(RUBRIC_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in doc:
            check.bad(key, f"missing (required: {', '.join(REQUIRED_KEYS)})")

    name = check.text(raw_name, "name") if "name" in doc else None
    if name is not None:
        if not NAME_PATTERN.match(name):
            check.bad(
                "name",
                f"{name!r} is not a valid name (lowercase letters, digits and '-', "
                "starting with a letter or digit, e.g. 'baroque-reviewer')",
            )
        elif name != path.stem:
            check.bad(
                "name",
                f"{name!r} differs from the file stem {path.stem!r} "
                "(rename the file or the rubric so they match)",
            )
    description = check.text(doc["description"], "description") if "description" in doc else None
    criteria = _criteria(doc["criteria"], check) if "criteria" in doc else None
    task_tags = _task_tags(doc["task_tags"], check) if "task_tags" in doc else ()

    if check.problems or name is None or description is None or criteria is None:
        return None, check.problems
    assert task_tags is not None
    return Rubric(name, description, tuple(criteria), task_tags), []


def _criteria(raw: Any, check: _Checker) -> list[Criterion] | None:
    if not isinstance(raw, list) or not raw:
        found = "an empty list" if raw == [] else _describe(raw)
        check.bad("criteria", f"expected a non-empty list of criteria, got {found}")
        return None
    out: list[Criterion] = []
    weights: list[int] = []
    names: dict[str, int] = {}  # casefolded name -> index of its first use
    for i, item in enumerate(raw):
        where = f"criteria[{i}]"
        if not isinstance(item, dict):
            check.bad(
                where,
                f"expected a mapping with keys {', '.join(CRITERION_KEYS)}, got {_describe(item)}",
            )
            continue
        for key in item:
            if key not in CRITERION_KEYS:
                check.bad(f"{where}.{key}", f"unknown key (allowed: {', '.join(CRITERION_KEYS)})")
        for key in CRITERION_KEYS:
            if key not in item:
                check.bad(f"{where}.{key}", f"missing (required: {', '.join(CRITERION_KEYS)})")

        name = check.text(item["name"], f"{where}.name") if "name" in item else None
        if name is not None:
            if name.casefold() in names:
                check.bad(
                    f"{where}.name",
                    f"{name!r} repeats criteria[{names[name.casefold()]}]"
                    ".name (criterion names must be unique, ignoring case)",
                )
            else:
                names[name.casefold()] = i
        weight = _weight(item["weight"], f"{where}.weight", check) if "weight" in item else None
        if weight is not None:
            weights.append(weight)
        levels = _levels(item["levels"], f"{where}.levels", check) if "levels" in item else None
        if name is not None and weight is not None and levels is not None:
            out.append(Criterion(name, weight, levels))

    # the sum is only meaningful when every weight could be read
    if len(weights) == len(raw) and sum(weights) != WEIGHT_TOTAL:
        check.problems.append(
            f"{check.prefix}: criteria weights sum to {sum(weights)}, "
            f"expected {WEIGHT_TOTAL} (got {weights})"
        )
    return out if len(out) == len(raw) else None


def _weight(raw: Any, field: str, check: _Checker) -> int | None:
    if isinstance(raw, bool) or not isinstance(raw, int):  # YAML `true` is a bool, not a weight
        check.bad(field, f"expected an integer percentage 1..{WEIGHT_TOTAL}, got {_describe(raw)}")
        return None
    if not 1 <= raw <= WEIGHT_TOTAL:
        check.bad(field, f"{raw} is out of range (expected 1..{WEIGHT_TOTAL})")
        return None
    return raw


def _levels(raw: Any, field: str, check: _Checker) -> dict[str, str] | None:
    need = f"need exactly: {', '.join(LEVEL_KEYS)}"
    if not isinstance(raw, dict):
        check.bad(field, f"expected a mapping of the five levels ({need}), got {_describe(raw)}")
        return None
    ok = True
    for key in raw:
        if key not in LEVEL_KEYS:
            check.bad(field, f"unknown level {key!r} ({need})")
            ok = False
    levels: dict[str, str] = {}
    for key in LEVEL_KEYS:
        if key not in raw:
            check.bad(field, f"missing {key!r} ({need})")
            ok = False
            continue
        text = check.text(raw[key], f"{field}.{key}")
        if text is None:
            ok = False
        else:
            levels[key] = text
    return levels if ok else None


def _task_tags(raw: Any, check: _Checker) -> tuple[str, ...] | None:
    allowed = ", ".join(TASK_TAGS)
    if not isinstance(raw, list):
        check.bad(
            "task_tags", f"expected a list of task genres (from: {allowed}), got {_describe(raw)}"
        )
        return None
    tags: list[str] = []
    ok = True
    for i, tag in enumerate(raw):
        if not isinstance(tag, str) or tag not in TASK_TAGS:
            check.bad(
                f"task_tags[{i}]", f"{_describe(tag)} is not a task genre (allowed: {allowed})"
            )
            ok = False
        elif tag in tags:
            check.bad(f"task_tags[{i}]", f"{tag!r} is listed twice")
            ok = False
        else:
            tags.append(tag)
    return tuple(tags) if ok else None


def _describe(value: Any) -> str:
    """A short rendering of a found value for messages: its YAML spelling and type."""
    if value is None:
        return "null"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({_type_name(value)})"


def _type_name(value: Any) -> str:
    names = {dict: "mapping", list: "list", str: "string", bool: "bool", int: "int", float: "float"}
    return names.get(type(value), type(value).__name__)


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell: line breaks to <br>, pipes escaped."""
    text = text.replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.splitlines())


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
