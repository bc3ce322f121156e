"""check: validate the composed config, every rubric file, every local task file and the
prompt templates in one pass, and print every problem (exit status 1 if any).
Writes nothing. Run: python jobs/launch.py stage=check
"""

from __future__ import annotations

import sys

from cpt.config import ConfigError, CptConfig, resolve_path
from cpt.rubric import validate_paths
from cpt.tasks import GENRES, SHIPPED_PATH, validate_task_files

TEMPLATE_FIELDS = {
    "teacher": {"rubrics", "task"},
    "teacher_target": {"level", "qualifier", "band"},
    "teacher_no_rubric": {"task"},
    "summarizer": {"rubrics", "targets", "variant_hint"},
    "judge": {
        "rubric_name",
        "rubric_description",
        "rubric_table",
        "task",
        "task_nonce",
        "response",
        "nonce",
    },
    "judge_repair": {"error"},
    "student": {"task"},
}


def template_problems(cfg: CptConfig) -> list[str]:
    import re

    problems = []
    for name, allowed in TEMPLATE_FIELDS.items():
        used = set(re.findall(r"\{\{(\w+)\}\}", getattr(cfg.prompts, name)))
        if used - allowed:
            problems.append(
                f"prompts.{name}: unknown placeholders {sorted(used - allowed)} "
                f"(allowed: {sorted(allowed)})"
            )
        if name == "judge" and not {"response", "nonce"} <= used:
            problems.append("prompts.judge: must place {{response}} between {{nonce}} delimiters")
    return problems


def collect_problems(cfg: CptConfig, config_problems: list[str]) -> list[str]:
    problems = list(config_problems)
    problems += validate_paths(resolve_path(cfg.rubrics.path))
    files = [
        SHIPPED_PATH if s.kind == "shipped" and not s.path else resolve_path(s.path)
        for s in cfg.tasks.sources
        if s.kind in ("shipped", "jsonl", "csv", "parquet")
    ]
    problems += validate_task_files(files, genres=GENRES)
    problems += template_problems(cfg)
    if not problems:
        try:
            from cpt.prompts import conditions

            conditions(cfg)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def run_check(cfg: CptConfig, config_problems: list[str]) -> None:
    problems = collect_problems(cfg, config_problems)
    for p in problems:
        print(f"problem: {p}")
    print(f"check: {len(problems)} problem(s)")
    if problems:
        sys.exit(1)
