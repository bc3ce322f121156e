"""Prompt construction: conditions (rubric(s) x target level(s)) and the filled templates.

Template text lives in conf/prompts/*.yaml; this module only fills it. Placeholders are
`{{name}}`; values are inserted verbatim and never re-scanned, so braces or `{{...}}` in
tasks and model outputs stay inert. A template naming an unknown placeholder is an error.

A *condition* is what CPT conditions on: one rubric at one target level, or several rubrics
each at its own level (compositional CPT, the paper's future work). Every prompt builder
takes a condition, so single and composed rubrics go through the same code.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from cpt.config import CptConfig, LevelConfig, LevelsConfig, PromptsConfig, resolve_path
from cpt.rubric import Rubric, load_rubrics

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

JUDGE_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "critique": {"type": "string", "maxLength": 400},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["critique", "score"],
    "additionalProperties": False,
}


def fill(template: str, **values: object) -> str:
    """Replace each {{name}} with str(values[name]) in one pass."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - values.keys())
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


@dataclass(frozen=True)
class Part:
    rubric: Rubric
    level: LevelConfig


@dataclass(frozen=True)
class Condition:
    """One conditioning: one or more (rubric, target level) parts."""

    parts: tuple[Part, ...]

    @property
    def rubric(self) -> str:
        """The rubric key: one name, or names joined by '+' for a composition."""
        return "+".join(p.rubric.name for p in self.parts)

    @property
    def level(self) -> str:
        """The level key: one level name, or names joined by '|' (one per rubric)."""
        return "|".join(p.level.name for p in self.parts)

    @property
    def task_tags(self) -> tuple[str, ...]:
        """Genres every part accepts (empty: all)."""
        tagged = [set(p.rubric.task_tags) for p in self.parts if p.rubric.task_tags]
        return tuple(sorted(set.intersection(*tagged))) if tagged else ()

    def applies_to(self, genre: str) -> bool:
        """True if a task of this genre goes with this condition (an untagged condition or
        an untagged task always matches)."""
        tags = self.task_tags
        return not tags or not genre or genre in tags


def _mtimes(path: Path) -> tuple:
    files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_mtime_ns) for f in files if f.exists())


@functools.lru_cache(maxsize=8)
def _cached_rubrics(path: str, mtimes: tuple) -> tuple[Rubric, ...]:
    """Rubric files parsed once per process (stage keys ask for them many times); an
    edited file changes `mtimes` and is read again."""
    return tuple(load_rubrics(path))


def load_selected_rubrics(cfg: CptConfig) -> list[Rubric]:
    """The rubrics under rubrics.path, restricted to rubrics.include (in that order)."""
    path = resolve_path(cfg.rubrics.path)
    rubrics = {r.name: r for r in _cached_rubrics(str(path), _mtimes(path))}
    names = cfg.rubrics.include or sorted(rubrics)
    unknown = [n for n in names if n not in rubrics]
    for combo in cfg.rubrics.combos:
        unknown += [n for n in combo.rubrics if n not in rubrics]
    if unknown:
        from cpt.config import ConfigError

        raise ConfigError(
            f"rubrics.include/combos: unknown rubrics {sorted(set(unknown))} "
            f"(available under {cfg.rubrics.path}: {', '.join(sorted(rubrics))})"
        )
    return [rubrics[n] for n in names] + [
        rubrics[n] for c in cfg.rubrics.combos for n in c.rubrics if n not in names
    ]


def conditions(cfg: CptConfig) -> list[Condition]:
    """Every conditioning of the grid: each included rubric at each level, then each combo
    at every tuple of `combo_levels` (all levels when empty)."""
    by_name = {r.name: r for r in load_selected_rubrics(cfg)}
    levels = cfg.levels.levels
    out = [
        Condition((Part(by_name[n], lv),))
        for n in (cfg.rubrics.include or sorted(by_name))
        for lv in levels
    ]
    combo_levels = [lv for lv in levels if lv.name in cfg.rubrics.combo_levels] or levels
    for combo in cfg.rubrics.combos:
        for tup in itertools.product(combo_levels, repeat=len(combo.rubrics)):
            out.append(Condition(tuple(Part(by_name[n], lv) for n, lv in zip(combo.rubrics, tup))))
    return out


def generation_rows(cfg: CptConfig) -> int | None:
    """At most this many teacher generations (hence judgements) in the grid; None when every
    task is used (`tasks.num_tasks=0`: the count is known only once the tasks are read)."""
    if not cfg.tasks.num_tasks:
        return None
    per_task = len(conditions(cfg)) + int(cfg.generate.no_rubric)
    return per_task * cfg.generate.samples * cfg.tasks.num_tasks


def conditions_fingerprint(cfg: CptConfig) -> list[object]:
    """What the conditions' prompts depend on: names, levels, qualifiers, rubric content."""
    return [
        [
            c.rubric,
            c.level,
            [p.level.qualifier for p in c.parts],
            [p.rubric.content_hash() for p in c.parts],
        ]
        for c in conditions(cfg)
    ]


def target_text(prompts: PromptsConfig, levels: LevelsConfig, level: LevelConfig) -> str:
    """The teacher's target for one rubric, from `prompts.teacher_target`: placeholders
    {{level}} (level name), {{qualifier}} (e.g. "extremely high") and {{band}} (the judge's
    score band, e.g. "92.5-100"; the default template shows it, the paper's does not)."""
    return fill(
        prompts.teacher_target,
        level=level.name,
        qualifier=level.qualifier,
        band=levels.scale.band(level.name),
    )


def _rubric_sections(
    cond: Condition, levels: LevelsConfig, prompts: PromptsConfig | None = None
) -> str:
    """Each part's rubric; with `prompts`, followed by its target (teacher_target)."""
    sections = []
    for p in cond.parts:
        text = f'Rubric "{p.rubric.name}": {p.rubric.description}\n\n{p.rubric.to_markdown()}'
        if prompts is not None:
            text += "\n\n" + target_text(prompts, levels, p.level)
        sections.append(text)
    return "\n\n".join(sections)


def _targets(cond: Condition) -> str:
    return "; ".join(f'{p.level.qualifier} adherence to "{p.rubric.name}"' for p in cond.parts)


def teacher_messages(
    prompts: PromptsConfig, levels: LevelsConfig, cond: Condition, task: str
) -> list[dict[str, str]]:
    """phi(x, R, level): the rubric(s) with their targets, then the task.

    With `prompts.prefix_layout` the targets (the only part that differs between the levels
    of one task) close the prompt instead, each named by its rubric, so a task's prompts at
    every level share their whole head: rubric(s), task and instructions.
    """
    if not prompts.prefix_layout:
        text = fill(prompts.teacher, rubrics=_rubric_sections(cond, levels, prompts), task=task)
        return [{"role": "user", "content": text}]
    targets = "\n".join(
        f'Rubric "{p.rubric.name}": {target_text(prompts, levels, p.level)}' for p in cond.parts
    )
    text = fill(prompts.teacher, rubrics=_rubric_sections(cond, levels), task=task)
    return [{"role": "user", "content": f"{text}\n\n{targets}"}]


def teacher_no_rubric_messages(prompts: PromptsConfig, task: str) -> list[dict[str, str]]:
    """The Table 2 'no rubric' baseline: the bare task."""
    return [{"role": "user", "content": fill(prompts.teacher_no_rubric, task=task)}]


def summarizer_messages(
    prompts: PromptsConfig, levels: LevelsConfig, cond: Condition, variant: int = 0
) -> list[dict[str, str]]:
    """summarize(R, level): asks for a 2-3 sentence system prompt that hides the rubric."""
    hint = (
        ""
        if variant == 0
        else (f" Word it differently from the most obvious phrasing (paraphrase {variant + 1}).")
    )
    text = fill(
        prompts.summarizer,
        rubrics=_rubric_sections(cond, levels),
        targets=_targets(cond),
        variant_hint=hint,
    )
    return [{"role": "user", "content": text}]


def judge_messages(
    prompts: PromptsConfig,
    rubric: Rubric,
    task: str,
    response: str,
    nonce: str,
    task_nonce: str = "",
) -> list[dict[str, str]]:
    """The judge sees the full rubric, the task and the response between nonce-tagged
    delimiters; the system turn tells it the response is data, never instructions.
    `task_nonce` tags the task's delimiters (empty: `nonce`, as the response's)."""
    text = fill(
        prompts.judge,
        rubric_name=rubric.name,
        rubric_description=rubric.description,
        rubric_table=rubric.to_markdown(),
        task=task,
        task_nonce=task_nonce or nonce,
        response=response,
        nonce=nonce,
    )
    return [{"role": "system", "content": prompts.judge_system}, {"role": "user", "content": text}]


def student_messages(prompts: PromptsConfig, system_prompt: str, task: str) -> list[dict[str, str]]:
    """What the CPT model sees at evaluation time: s(R, level) as the system turn + the task."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": fill(prompts.student, task=task)},
    ]
