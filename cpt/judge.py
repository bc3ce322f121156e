"""Structured judging: schema-constrained JSON, a repair retry, then a counted failure.

A judgement that cannot be parsed after `max_attempts` is recorded with `ok=False` and no
score. It is counted and shown, never turned into a 0. The parser accepts only the judge's
own answer as a whole (one JSON object, optionally in a code fence, optionally after a
reasoning block), so JSON quoted from the graded response can never become the score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from cpt.engines.base import Completion, Engine, Request, Sampling
from cpt.prompts import JUDGE_SCHEMA, fill
from cpt.rows import work_row

_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Judgement:
    ok: bool
    score: float | None
    critique: str
    error: str
    attempts: int
    raw: str


def parse_judgement(text: str) -> tuple[float | None, str, str]:
    """(score, critique, error): error is "" on success, else why the text was rejected."""
    body = _THINK.sub("", text or "").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return None, "", "empty answer"
    try:
        obj = json.loads(body, strict=False)  # strict=False: control characters in strings
    except json.JSONDecodeError as exc:
        return None, "", f"not a single JSON object ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict):
        return None, "", f"expected a JSON object, got {type(obj).__name__}"
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float):
        return None, "", f"'score' must be a number 0-100, got {score!r}"[:200]
    if not 0 <= score <= 100 or score != score:
        return None, "", f"'score' must be within 0-100, got {score}"
    critique = obj.get("critique", "")
    if not isinstance(critique, str):
        return None, "", f"'critique' must be a string, got {type(critique).__name__}"
    return float(score), critique, ""


@dataclass(frozen=True)
class JudgeItem:
    id: str
    messages: tuple[dict[str, str], ...]
    seed: int


def judge_all(
    engine: Engine,
    items: list[JudgeItem],
    sampling: Sampling,
    repair_template: str,
    max_attempts: int,
) -> tuple[list[Judgement], list[Completion]]:
    """Judge every item; items whose answer does not parse get the repair prompt and retry.

    Returns one Judgement per item (in order) and all completions (for token accounting).
    """
    answers: dict[str, Judgement] = {}
    completions: list[Completion] = []
    conversations = {it.id: list(it.messages) for it in items}
    seeds = {it.id: it.seed for it in items}
    pending = [it.id for it in items]
    for attempt in range(1, max_attempts + 1):
        requests = [
            Request(
                id=i,
                messages=tuple(conversations[i]),
                json_schema=JUDGE_SCHEMA,
                sampling=Sampling(
                    sampling.max_new_tokens,
                    sampling.temperature,
                    sampling.top_p,
                    seeds[i] + attempt - 1,
                ),
            )
            for i in pending
        ]
        outs = engine.generate(requests)
        completions += outs
        still = []
        for out in outs:
            if out.finish_reason == "error":
                score, critique, error = None, "", f"engine error: {out.error}"
            else:
                score, critique, error = parse_judgement(out.text)
            if not error:
                answers[out.id] = Judgement(True, score, critique, "", attempt, out.text)
                continue
            answers[out.id] = Judgement(False, None, "", error, attempt, out.text)
            conversations[out.id] += [
                {"role": "assistant", "content": out.text},
                {"role": "user", "content": fill(repair_template, error=error)},
            ]
            still.append(out.id)
        pending = still
        if not pending:
            break
    return [answers[it.id] for it in items], completions


def judge_grid(
    cfg,
    tasks: dict[str, str],
    responses: list[dict],
    tag: str,
    parts: Callable[[dict], list[tuple[str, str]]],
    meta: Callable[[dict], dict],
) -> list[dict]:
    """Judge work rows: one per (response, rubric part), the prompt holding the full rubric,
    the task and the response between per-row nonce delimiters. `parts` gives a response's
    (rubric, level) parts; `meta` the columns carried to the output row."""
    from cpt.prompts import judge_messages, judge_nonce, load_selected_rubrics
    from cpt.store import content_hash

    rubrics = {r.name: r for r in load_selected_rubrics(cfg)}
    rows = []
    for g in responses:
        for part_rubric, part_level in parts(g):
            msgs = judge_messages(
                cfg.prompts,
                rubrics[part_rubric],
                tasks[g["task_id"]],
                g["text"],
                judge_nonce(g["id"], part_rubric),
            )
            rows.append(
                work_row(
                    content_hash([tag, g["id"], part_rubric]),
                    msgs,
                    cfg.seed,
                    gen_id=g["id"],
                    task_id=g["task_id"],
                    rubric=g["rubric"],
                    level=g["level"],
                    part_rubric=part_rubric,
                    part_level=part_level,
                    sample_idx=g["sample_idx"],
                    **meta(g),
                )
            )
    return rows


def condition_parts(response: dict) -> list[tuple[str, str]]:
    """The (rubric, level) parts of a response's condition ('a+b', 'low|moderate')."""
    return list(zip(response["rubric"].split("+"), response["level"].split("|")))
