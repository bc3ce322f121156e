"""Rubric model: loading, every validation rule (message names file, rubric and field), rendering,
hashing, folders and the shipped rubrics."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt.rubric import (
    LEVEL_KEYS,
    MAX_TEXT_CHARS,
    TASK_TAGS,
    Criterion,
    Rubric,
    RubricError,
    load_rubric,
    load_rubrics,
    validate_paths,
)

SHIPPED = Path(__file__).resolve().parents[1] / "rubrics"


def _levels(tag: str) -> dict[str, str]:
    return {k: f"{tag} at the {k} level." for k in LEVEL_KEYS}


VALID: dict[str, Any] = {
    "name": "tiny-style",
    "description": "A small rubric for tests.",
    "criteria": [
        {"name": "Alpha", "weight": 50, "levels": _levels("Alpha")},
        {"name": "Beta", "weight": 30, "levels": _levels("Beta")},
        {"name": "Gamma", "weight": 20, "levels": _levels("Gamma")},
    ],
}


def write(folder: Path, doc: Any, stem: str = "tiny-style", suffix: str = ".yaml") -> Path:
    path = folder / f"{stem}{suffix}"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def edited(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    doc.update(changes)
    return doc


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RubricError) as info:
        load_rubric(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(path: Path, field: str, *fragments: str, rubric: str = "tiny-style") -> str:
    """The file's single problem; it must name the file, the rubric, the field and the fragments."""
    problems = problems_of(path)
    assert len(problems) == 1, problems
    msg = problems[0]
    assert msg.startswith(f"{path}: rubric '{rubric}': {field}"), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_valid_rubric_loads(tmp_path: Path) -> None:
    doc = edited(task_tags=["poem", "story"])
    doc["criteria"][0]["levels"]["good"] = "  padded text \n"
    rubric = load_rubric(write(tmp_path, doc))
    assert rubric.name == "tiny-style"
    assert [c.name for c in rubric.criteria] == ["Alpha", "Beta", "Gamma"]
    assert [c.weight for c in rubric.criteria] == [50, 30, 20]
    assert tuple(rubric.criteria[0].levels) == LEVEL_KEYS
    assert rubric.criteria[0].levels["good"] == "padded text"  # stripped
    assert rubric.task_tags == ("poem", "story")
    untagged = load_rubric(write(tmp_path, VALID))
    assert untagged.task_tags == ()  # no tags: every task (see Condition.applies_to)


@pytest.mark.parametrize("key", ["name", "description", "criteria"])
def test_required_key_missing(tmp_path: Path, key: str) -> None:
    doc = edited()
    del doc[key]
    only_problem(write(tmp_path, doc), key, "missing", "required")


def test_unknown_rubric_key(tmp_path: Path) -> None:
    only_problem(write(tmp_path, edited(weights=[1])), "weights", "unknown key", "task_tags")


def test_unknown_criterion_key(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][1]["wieght"] = 5
    only_problem(write(tmp_path, doc), "criteria[1].wieght", "unknown key", "name, weight, levels")


@pytest.mark.parametrize("bad", ["Tiny_Style", "-tiny", "tiny style", ""])
def test_name_pattern(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, edited(name=bad))
    msg = only_problem(path, "name", rubric=bad.strip() or "tiny-style")
    assert ("not a valid name" if bad else "is empty") in msg


def test_name_must_equal_file_stem(tmp_path: Path) -> None:
    path = write(tmp_path, VALID, stem="other-name")
    only_problem(path, "name", "'tiny-style'", "'other-name'", "file stem")


@pytest.mark.parametrize("bad", ["   ", 42, None, ["a"]])
def test_description_non_empty_string(tmp_path: Path, bad: Any) -> None:
    only_problem(write(tmp_path, edited(description=bad)), "description", "non-empty string")


@pytest.mark.parametrize(
    ("bad", "found"), [([], "empty list"), ({"a": 1}, "mapping"), ("x", "string")]
)
def test_criteria_non_empty_list(tmp_path: Path, bad: Any, found: str) -> None:
    only_problem(write(tmp_path, edited(criteria=bad)), "criteria", "non-empty list", found)


def test_criterion_must_be_mapping(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][2] = "Gamma"
    only_problem(write(tmp_path, doc), "criteria[2]", "expected a mapping")


def test_criterion_names_unique_ignoring_case(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][2]["name"] = "alpha"
    only_problem(write(tmp_path, doc), "criteria[2].name", "'alpha'", "criteria[0].name", "unique")


def test_criterion_name_non_empty(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][1]["name"] = " "
    only_problem(write(tmp_path, doc), "criteria[1].name", "empty")


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (True, "(bool)"),
        (30.0, "(float)"),
        ("30", "(string)"),
        (0, "out of range"),
        (101, "out of range"),
    ],
)
def test_weight_is_int_in_range(tmp_path: Path, bad: Any, fragment: str) -> None:
    doc = edited()
    doc["criteria"][0]["weight"] = bad
    only_problem(write(tmp_path, doc), "criteria[0].weight", fragment, "1..100")


def test_weights_sum_to_100(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][0]["weight"] = 40
    path = write(tmp_path, doc)
    assert problems_of(path) == [
        f"{path}: rubric 'tiny-style': criteria weights sum to 90, expected 100 (got [40, 30, 20])"
    ]


def test_levels_missing_key(tmp_path: Path) -> None:
    doc = edited()
    del doc["criteria"][1]["levels"]["fair"]
    path = write(tmp_path, doc)
    assert problems_of(path) == [
        f"{path}: rubric 'tiny-style': criteria[1].levels: missing 'fair' "
        "(need exactly: excellent, good, fair, poor, unsatisfactory)"
    ]


def test_levels_unknown_key(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][0]["levels"]["great"] = "Extra."
    only_problem(
        write(tmp_path, doc), "criteria[0].levels", "unknown level 'great'", "need exactly"
    )


def test_levels_must_be_mapping(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][0]["levels"] = ["a", "b", "c", "d", "e"]
    only_problem(write(tmp_path, doc), "criteria[0].levels", "expected a mapping", "(list)")


@pytest.mark.parametrize("bad", ["", "  \n ", None, 3])
def test_descriptor_non_empty_string(tmp_path: Path, bad: Any) -> None:
    doc = edited()
    doc["criteria"][2]["levels"]["poor"] = bad
    only_problem(write(tmp_path, doc), "criteria[2].levels.poor", "non-empty string")


def test_text_size_limit(tmp_path: Path) -> None:
    doc = edited()
    doc["criteria"][0]["levels"]["good"] = "x" * (MAX_TEXT_CHARS + 1)
    only_problem(write(tmp_path, doc), "criteria[0].levels.good", f"limit is {MAX_TEXT_CHARS}")
    at_limit = edited(description="y" * MAX_TEXT_CHARS)
    assert load_rubric(write(tmp_path, at_limit)).description == "y" * MAX_TEXT_CHARS


@pytest.mark.parametrize(
    ("tags", "field", "fragment"),
    [
        (["poem", "novel"], "task_tags[1]", "'novel'"),
        (["poem", "poem"], "task_tags[1]", "twice"),
        ("poem", "task_tags", "expected a list"),
        (None, "task_tags", "null"),
    ],
)
def test_task_tags_vocabulary(tmp_path: Path, tags: Any, field: str, fragment: str) -> None:
    msg = only_problem(write(tmp_path, edited(task_tags=tags)), field, fragment)
    if fragment != "twice":
        assert ", ".join(TASK_TAGS) in msg  # says what is allowed


def test_all_problems_of_a_file_in_one_error(tmp_path: Path) -> None:
    doc = edited(description="", colour="red")
    doc["criteria"][0]["weight"] = True
    del doc["criteria"][1]["levels"]["poor"]
    problems = problems_of(write(tmp_path, doc))
    fields = [p.split(": ")[2] for p in problems]
    assert fields == ["colour", "description", "criteria[0].weight", "criteria[1].levels"]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tiny-style.yaml"
    path.write_bytes(b"name: tiny-style\ndescription: caf\xe9\n")
    (msg,) = problems_of(path)
    assert msg.startswith(f"{path}: not valid UTF-8") and "0xe9" in msg


def test_not_yaml(tmp_path: Path) -> None:
    (msg,) = problems_of(write(tmp_path, "name: [unclosed\ndescription: x\n"))
    assert msg.startswith(f"{tmp_path / 'tiny-style.yaml'}: not valid YAML at line")


@pytest.mark.parametrize(("text", "found"), [("- a\n- b\n", "a list"), ("", "an empty file")])
def test_not_a_mapping(tmp_path: Path, text: str, found: str) -> None:
    (msg,) = problems_of(write(tmp_path, text))
    assert msg.startswith(f"{tmp_path / 'tiny-style.yaml'}: expected a YAML mapping")
    assert msg.endswith(found)


def test_to_markdown_table(tmp_path: Path) -> None:
    rubric = load_rubric(write(tmp_path, VALID))
    lines = rubric.to_markdown().splitlines()
    assert lines[0] == "| Criterion | Weight | Excellent | Good | Fair | Poor | Unsatisfactory |"
    assert lines[1] == "| --- | --- | --- | --- | --- | --- | --- |"
    assert len(lines) == 2 + len(rubric.criteria)
    assert lines[2].startswith("| Alpha | 50% | Alpha at the excellent level. | ")
    assert lines[4].endswith("| Gamma at the unsatisfactory level. |")


def test_to_markdown_escapes_pipes_and_newlines() -> None:
    levels = dict.fromkeys(LEVEL_KEYS, "plain")
    levels["fair"] = "a | b\nsecond line"
    rubric = Rubric("r", "d", (Criterion("Pipe|Name", 100, levels),))
    row = rubric.to_markdown().splitlines()[2]
    assert "Pipe\\|Name" in row and "a \\| b<br>second line" in row
    unescaped = row.replace("\\|", "")
    assert unescaped.count("|") == 8  # still exactly seven cells


def test_content_hash_stable_and_sensitive(tmp_path: Path) -> None:
    a = load_rubric(write(tmp_path, VALID))
    relaid = "# a comment\n" + yaml.safe_dump(VALID, sort_keys=True, default_flow_style=True)
    b = load_rubric(write(tmp_path, relaid))
    assert a.content_hash() == b.content_hash()
    assert len(a.content_hash()) == 16 and int(a.content_hash(), 16) >= 0
    changed = edited()
    changed["criteria"][0]["levels"]["poor"] = "Different words."
    assert load_rubric(write(tmp_path, changed)).content_hash() != a.content_hash()


def test_load_folder(tmp_path: Path) -> None:
    write(tmp_path, edited(name="zeta"), stem="zeta")
    write(tmp_path, edited(name="alpha"), stem="alpha", suffix=".yml")
    (tmp_path / "notes.txt").write_text("not a rubric")
    (tmp_path / "tasks").mkdir()
    write(tmp_path / "tasks", "- not read\n", stem="list")
    assert [r.name for r in load_rubrics(tmp_path)] == ["alpha", "zeta"]
    assert [r.name for r in load_rubrics(tmp_path / "zeta.yaml")] == ["zeta"]


def test_load_paths_that_are_not_rubric_files(tmp_path: Path) -> None:
    with pytest.raises(RubricError, match="no rubric files"):
        load_rubrics(tmp_path)
    with pytest.raises(RubricError, match="does not exist"):
        load_rubrics(tmp_path / "missing")
    with pytest.raises(RubricError, match="is a folder"):
        load_rubric(tmp_path)


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, VALID, suffix=".yaml")
    second = write(tmp_path, VALID, suffix=".yml")
    with pytest.raises(RubricError) as info:
        load_rubrics(tmp_path)
    (msg,) = info.value.problems
    assert msg.startswith(f"{second}: rubric 'tiny-style': name: already defined in ")
    assert str(tmp_path / "tiny-style.yaml") in msg


def test_validate_paths_reports_everything_at_once(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    write(good, VALID)
    no_fair = edited(name="one")
    del no_fair["criteria"][0]["levels"]["fair"]
    write(bad, no_fair, stem="one")
    write(bad, edited(name="two", description=""), stem="two")
    (bad / "three.yaml").write_bytes(b"\xff\xfe")
    problems = validate_paths([good, bad, tmp_path / "nowhere", good])
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{bad / 'one.yaml'}: rubric 'one': criteria[0].levels")
    assert problems[1].startswith(f"{bad / 'three.yaml'}: not valid UTF-8")
    assert problems[2].startswith(f"{bad / 'two.yaml'}: rubric 'two': description")
    assert problems[3].startswith(f"{tmp_path / 'nowhere'}: does not exist")
    assert validate_paths(good) == []


def test_shipped_rubrics_are_valid() -> None:
    assert validate_paths(SHIPPED) == []
    rubrics = load_rubrics(SHIPPED)
    names = {r.name for r in rubrics}
    assert len(rubrics) >= 12
    paper = {
        "avant-garde-film-critic",
        "baroque-reviewer",
        "esoteric-interpreter",
        "creative-chaos",
    }
    assert paper <= names
    for rubric in rubrics:
        assert 3 <= len(rubric.criteria) <= 5, rubric.name
        assert len(rubric.to_markdown().splitlines()) == 2 + len(rubric.criteria)
    hashes = {r.content_hash() for r in rubrics}
    assert len(hashes) == len(rubrics)
