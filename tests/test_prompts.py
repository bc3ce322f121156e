"""Templates, conditions (single and compositional) and the teacher/summarizer prompts."""

from __future__ import annotations

import pytest
from conftest import compose

from cpt.prompts import (
    conditions,
    fill,
    student_messages,
    summarizer_messages,
    teacher_messages,
    teacher_no_rubric_messages,
)
from cpt.system_prompts import clean_system_prompt


def test_fill_inserts_values_verbatim_and_never_rescans():
    out = fill("A {{x}} B {{y}}", x="{{y}}", y="{z}")
    assert out == "A {{y}} B {z}"
    with pytest.raises(KeyError, match="y"):
        fill("{{x}} {{y}}", x=1)


def test_paper_conditions_grid():
    cfg = compose("rubrics=paper")
    conds = conditions(cfg)
    assert len(conds) == 4 * 3
    assert {c.level for c in conds} == {"low", "moderate", "extremely_high"}
    assert all(len(c.parts) == 1 for c in conds)


def test_compositional_conditions():
    cfg = compose("rubrics=compose")
    combos = [c for c in conditions(cfg) if len(c.parts) == 2]
    assert len(combos) == 4  # 2 rubrics x combo_levels [low, extremely_high]
    c = combos[1]
    assert c.rubric == "humour+formal-register" and c.level == "low|extremely_high"
    msg = teacher_messages(cfg.prompts, cfg.levels, c, "Write a memo.")[0]["content"]
    assert 'Rubric "humour"' in msg and 'Rubric "formal-register"' in msg
    assert msg.index("low (a judge") < msg.index("extremely high (a judge")
    s = summarizer_messages(cfg.prompts, cfg.levels, c)[0]["content"]
    assert 'low adherence to "humour"' in s and 'extremely high adherence to "formal-register"' in s


def test_teacher_prompt_shows_rubric_then_task_and_the_band():
    cfg = compose()
    cond = conditions(cfg)[2]  # extremely_high of the first rubric
    msg = teacher_messages(cfg.prompts, cfg.levels, cond, "TASK-TEXT")[0]["content"]
    rubric = cond.parts[0].rubric
    assert rubric.to_markdown() in msg
    assert msg.index(rubric.to_markdown()) < msg.index("TASK-TEXT")
    assert "extremely high" in msg and "92.5-100" in msg
    assert cfg.levels.scale.band(cfg.levels.levels[0].name) == "0-40"


def test_no_rubric_baseline_is_the_bare_task():
    cfg = compose()
    assert teacher_no_rubric_messages(cfg.prompts, "Just this.") == [
        {"role": "user", "content": "Just this."}
    ]


def test_summarizer_asks_to_hide_the_rubric_and_varies_paraphrases():
    cfg = compose()
    cond = conditions(cfg)[0]
    a = summarizer_messages(cfg.prompts, cfg.levels, cond, 0)[0]["content"]
    b = summarizer_messages(cfg.prompts, cfg.levels, cond, 1)[0]["content"]
    assert "do not copy the table" in a and "two or three sentences" in a
    assert a != b and "paraphrase 2" in b


def test_student_messages_carry_the_system_prompt():
    cfg = compose()
    msgs = student_messages(cfg.prompts, "Be ornate.", "Describe a chair.")
    assert msgs == [
        {"role": "system", "content": "Be ornate."},
        {"role": "user", "content": "Describe a chair."},
    ]


@pytest.mark.parametrize(
    "raw,clean",
    [
        ('"Write plainly."', "Write plainly."),
        ("System prompt: Write plainly.", "Write plainly."),
        ("  Write plainly.  ", "Write plainly."),
        ("", ""),
    ],
)
def test_clean_system_prompt(raw, clean):
    assert clean_system_prompt(raw) == clean


def test_rubric_task_tags_filter_the_grid():
    cfg = compose("rubrics.include=[support-empathy]")
    cond = conditions(cfg)[0]
    assert cond.task_tags == ("letter", "support")
    assert cond.applies_to("letter") and not cond.applies_to("poem")
    assert cond.applies_to("")  # an untagged task goes with every condition
    untagged = conditions(compose("rubrics.include=[concision]"))[0]
    assert untagged.task_tags == () and untagged.applies_to("poem")  # no tags: every task


def test_teacher_target_is_a_template_default_band_hint_vs_paper_wording():
    # the default keeps the judge's band hint, byte for byte as before templating
    cfg = compose()
    cond = conditions(cfg)[2]
    msg = teacher_messages(cfg.prompts, cfg.levels, cond, "TASK")[0]["content"]
    assert (
        "Target adherence to this rubric: extremely high (a judge's score from 0 to 100 "
        "would fall in 92.5-100)." in msg
    )
    # prompts=paper: the level in words only, everything else unchanged
    paper = compose("prompts=paper")
    assert paper.prompts.name == "paper"
    text = teacher_messages(paper.prompts, paper.levels, cond, "TASK")[0]["content"]
    assert "Target adherence to this rubric: extremely high.\n" in text + "\n"
    assert "92.5" not in text and "judge" not in text
    assert paper.prompts.judge == cfg.prompts.judge
    assert paper.prompts.teacher == cfg.prompts.teacher


def test_teacher_target_placeholders_are_checked():
    from cpt.commands.check import template_problems

    cfg = compose("prompts.teacher_target='aim: {{qualifier}} {{score}}'")
    assert template_problems(cfg) == [
        "prompts.teacher_target: unknown placeholders ['score'] "
        "(allowed: ['band', 'level', 'qualifier'])"
    ]
    assert template_problems(compose("prompts=paper")) == []
