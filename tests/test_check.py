"""stage=check reports every problem of the shipped and user files in one pass."""

from __future__ import annotations

import shutil

from conftest import REPO, compose, launch

from cpt.commands.check import collect_problems, template_problems


def test_shipped_files_pass():
    proc = launch("stage=check", "rubrics=all", "tasks=shipped")
    assert "check: 0 problem(s)" in proc.stdout


def test_all_problems_in_one_pass(tmp_path):
    rubrics = tmp_path / "rubrics"
    rubrics.mkdir()
    shutil.copy(REPO / "rubrics" / "humour.yaml", rubrics / "humour.yaml")
    text = (rubrics / "humour.yaml").read_text().replace("weight: 30", "weight: 20", 1)
    (rubrics / "humour.yaml").write_text(text)
    (rubrics / "broken.yaml").write_bytes(b"name: broken\ndescription: \xff\xfe\n")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text('{"text": "ok task"}\n{"txt": "no text field"}\nnot json\n')
    proc = launch(
        "stage=check",
        f"rubrics.path={rubrics}",
        f"tasks.sources=[{{kind: jsonl, path: {tasks}}}]",
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 1
    assert "humour.yaml: rubric 'humour': criteria weights sum to 90" in out
    assert "broken.yaml: not valid UTF-8" in out
    assert "t.jsonl:2" in out and "t.jsonl:3" in out
    assert "check: " in out and "problem(s)" in out


def test_template_placeholders_are_checked():
    cfg = compose("prompts.teacher='{{rubrics}} {{task}} {{oops}}'")
    assert any("unknown placeholders ['oops']" in p for p in template_problems(cfg))
    assert collect_problems(compose(), []) == []
