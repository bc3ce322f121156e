"""The teacher's system prompts as the pairs and evaluate stages use them: cleaned of
labels and quotes, a fallback built from the rubric when one is empty, and one paraphrase
picked per (task, condition), seeded so every run picks the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.prompts import conditions


def clean_system_prompt(text: str) -> str:
    """Teachers like to wrap the answer in quotes or a label; keep the prompt only."""
    text = text.strip()
    for label in ("System prompt:", "System Prompt:", "SYSTEM PROMPT:"):
        if text.startswith(label):
            text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def fallback_system_prompt(cfg: CptConfig, rubric: str, level: str) -> str:
    """Used when the teacher's system prompt is empty: built from the rubric descriptions."""
    cond = next(c for c in conditions(cfg) if c.rubric == rubric and c.level == level)
    return " ".join(
        f"Write with {p.level.qualifier} adherence to this style: {p.rubric.description}"
        for p in cond.parts
    )


def load_system_prompts(
    cfg: CptConfig, stage_dir: Path
) -> tuple[dict[tuple[str, str], list[str]], int]:
    """(rubric, level) -> system prompts (by paraphrase), and how many fell back."""
    table = store.read_table(stage_dir, ["rubric", "level", "paraphrase", "text"]).to_pylist()
    out: dict[tuple[str, str], list[str]] = {}
    fallbacks = 0
    for row in sorted(table, key=lambda r: (r["rubric"], r["level"], r["paraphrase"])):
        text = clean_system_prompt(row["text"] or "")
        if not text:
            text = fallback_system_prompt(cfg, row["rubric"], row["level"])
            fallbacks += 1
        out.setdefault((row["rubric"], row["level"]), []).append(text)
    return out, fallbacks


def pick(prompts: list[str], *key: Any) -> str:
    """One paraphrase for a (task, condition): seeded by the key, stable across runs."""
    if len(prompts) == 1:  # no hash needed (pairs calls this per row)
        return prompts[0]
    return prompts[int(store.content_hash(list(key), 8), 16) % len(prompts)]
