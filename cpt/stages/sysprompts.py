"""sysprompts: s = summarize(R, level) by the teacher, for every condition (x paraphrases).
Reads nothing but the config; writes sysprompts/*.parquet: id, rubric, level, paraphrase,
text (the system prompt), token counts.
Run alone: python jobs/launch.py stage=sysprompts
"""

from __future__ import annotations

from typing import Any

from cpt import store
from cpt.config import CptConfig
from cpt.generation import GenerateFactory, run_rows, work_row
from cpt.parallel import n_shards
from cpt.pipeline import StageContext
from cpt.prompts import conditions, summarizer_messages
from cpt.stages.generate import conditions_fingerprint


def params(cfg: CptConfig) -> dict[str, Any]:
    return {
        "teacher": cfg.teacher,
        "engine": (cfg.teacher.engine or cfg.engine.kind),
        "conditions": conditions_fingerprint(cfg),
        "levels": cfg.levels,
        "template": cfg.prompts.summarizer,
        "sysprompts": cfg.sysprompts,
        "seed": cfg.seed,
    }


def clean_system_prompt(text: str) -> str:
    """Teachers like to wrap the answer in quotes or a label; keep the prompt only."""
    text = text.strip()
    for label in ("System prompt:", "System Prompt:", "SYSTEM PROMPT:"):
        if text.startswith(label):
            text = text[len(label) :].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    rows = []
    for cond in conditions(cfg):
        for k in range(cfg.sysprompts.paraphrases):
            rid = store.content_hash(["sys", cond.rubric, cond.level, k])
            rows.append(
                work_row(
                    rid,
                    summarizer_messages(cfg.prompts, cfg.levels, cond, k),
                    cfg.seed,
                    rubric=cond.rubric,
                    level=cond.level,
                    paraphrase=k,
                )
            )
    stats = run_rows(
        rows,
        ctx.out_dir,
        cfg.sysprompts.shard_size,
        GenerateFactory(cfg.teacher, cfg.engine),
        cfg.teacher,
        cfg.engine,
        cfg.parallel,
        label="sysprompts",
    )
    return stats.as_dict()


def plan(cfg: CptConfig) -> dict[str, Any]:
    n = len(conditions(cfg)) * cfg.sysprompts.paraphrases
    return {"rows": n, "shards": n_shards(n, cfg.sysprompts.shard_size)}


def fallback_system_prompt(cfg: CptConfig, rubric: str, level: str) -> str:
    """Used when the teacher's system prompt is empty: built from the rubric descriptions."""
    cond = next(c for c in conditions(cfg) if c.rubric == rubric and c.level == level)
    return " ".join(
        f"Write with {p.level.qualifier} adherence to this style: {p.rubric.description}"
        for p in cond.parts
    )


def load_system_prompts(cfg: CptConfig, stage_dir) -> tuple[dict[tuple[str, str], list[str]], int]:
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
