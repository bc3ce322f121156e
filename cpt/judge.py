"""Structured judging: schema-constrained JSON, a repair retry, then a counted failure.

A judgement that cannot be parsed after `max_attempts` is recorded with `ok=False` and no
score. It is counted and shown, never turned into a 0. The parser accepts only the judge's
own answer as a whole (one JSON object, optionally in a code fence, optionally after a
reasoning block), so JSON quoted from the graded response can never become the score, and
only exactly the schema: `{"critique": <string>, "score": <integer 0-100>}`, no other or
repeated key, no `55.5`, `1e2` or `100.0`.

What is never scored: an answer cut at the token limit (`finish_reason="length"`, even if
what came before the cut parses), a response that contains the judge's delimiter nonce, a
failed generation. Engine errors are not retried here (an engine retries transient ones
itself; a prompt that does not fit fails the same way every time). Responses longer than the
judge's context are cut, by the judge's own tokens, to fit beside the instructions, and the
cut is counted (`response_truncated`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cpt.engines.base import Completion, Engine, Request, Sampling
from cpt.prompts import JUDGE_SCHEMA, fill
from cpt.rows import work_row

log = logging.getLogger(__name__)

_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)
KEYS = ("critique", "score")
JUDGE_KEY = ".judge-key"  # in a judging stage's folder: the secret its delimiter nonces use


@dataclass(frozen=True)
class Judgement:
    ok: bool
    score: float | None
    critique: str
    error: str
    attempts: int
    raw: str


class _SchemaError(ValueError):
    """The answer is JSON but not the judge schema."""


class _Literal(str):
    """A JSON number with a fraction or exponent (or NaN/Infinity), kept as written."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _SchemaError(f"duplicate key {key!r} (each key once)"[:200])
        obj[key] = value
    return obj


def parse_judgement(text: str) -> tuple[float | None, str, str]:
    """(score, critique, error): error is "" on success, else why the text was rejected."""
    body = _THINK.sub("", text or "").strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return None, "", "empty answer"
    try:
        obj = json.loads(
            body,
            strict=False,  # control characters in strings (a random model's critique)
            object_pairs_hook=_no_repeats,
            parse_float=_Literal,
            parse_constant=_Literal,
        )
    except _SchemaError as exc:
        return None, "", str(exc)
    except json.JSONDecodeError as exc:
        return None, "", f"not a single JSON object ({exc.msg} at char {exc.pos})"
    if not isinstance(obj, dict):
        return None, "", f"expected a JSON object, got {type(obj).__name__}"
    extra = sorted(set(obj) - set(KEYS))
    if extra:
        return None, "", f"unexpected key(s) {extra} (allowed: critique, score)"[:200]
    if "score" not in obj:
        return None, "", "'score' is missing (an integer 0-100 is required)"
    score = obj["score"]
    if type(score) is not int:  # not bool, not 55.5 / 1e2 / 100.0 / NaN, not "90"
        shown = str(score) if isinstance(score, _Literal) else repr(score)
        return None, "", f"'score' must be an integer 0-100, got {shown}"[:200]
    if not 0 <= score <= 100:
        return None, "", f"'score' must be within 0-100, got {score}"
    if "critique" not in obj:
        return None, "", "'critique' is missing (a string is required)"
    critique = obj["critique"]
    if not isinstance(critique, str):
        return None, "", f"'critique' must be a string, got {type(critique).__name__}"
    return float(score), critique, ""


def judge_nonce(key: bytes | None = None, *parts: str) -> str:
    """The tag of one judgement's delimiters (64 bits): HMAC-SHA256 of `parts` (row id,
    rubric) under a secret `key`, or fresh from `secrets` without a key. A response cannot
    know it in advance; with the stage's key (`cpt.store.secret_file`, drawn with `secrets`
    once per stage folder) a resumed stage gives the same prompts as an uninterrupted one."""
    if key is None:
        return secrets.token_hex(8).upper()
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:16].upper()


TRUNCATED = "not judged: the response was cut at max_new_tokens"


@dataclass(frozen=True)
class JudgeItem:
    """One judgement to make; a non-empty `refuse` says why it is not sent to the judge."""

    id: str
    messages: tuple[dict[str, str], ...]
    seed: int
    refuse: str = ""


def judge_all(
    engine: Engine,
    items: list[JudgeItem],
    sampling: Sampling,
    repair_template: str,
    max_attempts: int,
) -> tuple[list[Judgement], list[Completion]]:
    """Judge every item; items whose answer does not parse get the repair prompt and retry.

    Returns one Judgement per item (in order) and all completions (for token accounting).
    Refused items and engine errors are failures at once (reason in `error`); an answer
    that does not parse or was cut at the token limit gets the repair prompt, up to
    `max_attempts` calls in all.
    """
    answers: dict[str, Judgement] = {}
    completions: list[Completion] = []
    conversations = {it.id: list(it.messages) for it in items}
    seeds = {it.id: it.seed for it in items}
    for it in items:
        if it.refuse:  # counted as a failure, never sent
            answers[it.id] = Judgement(False, None, "", it.refuse, 0, "")
    pending = [it.id for it in items if not it.refuse]
    for attempt in range(1, max_attempts + 1):
        if not pending:
            break
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
            if out.finish_reason == "error":  # not retried: a repair prompt cannot fix it
                error = f"engine error: {out.error}"
                answers[out.id] = Judgement(False, None, "", error, attempt, out.text)
                continue
            if out.finish_reason == "length":  # a cut answer is never scored
                score, critique, error = (
                    None,
                    "",
                    f"answer cut at the token limit (max_new_tokens={sampling.max_new_tokens})"
                    "; answer with the JSON object only",
                )
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
    return [answers[it.id] for it in items], completions


def judge_grid(
    cfg,
    tasks: dict[str, str],
    responses: list[dict],
    tag: str,
    parts: Callable[[dict], list[tuple[str, str]]],
    meta: Callable[[dict], dict],
    nonce_key: bytes | None = None,
    judge_truncated: bool = False,
    cut_to_fit: bool = True,
) -> list[dict]:
    """Judge work rows: one per (response, rubric part), the prompt holding the full rubric,
    the task and the response between delimiters tagged with a nonce (column `nonce`) that
    `judge_nonce` derives from `nonce_key` (the stage's secret; None: a fresh random key).
    `parts` gives a response's (rubric, level) parts; `meta` the columns carried to the
    output row. With `prompts.prefix_layout` the task's delimiters carry a nonce of their own
    (column `task_nonce`), one per (task, rubric) under the same key, so the prompts of one
    task share their head up to the response; else `task_nonce` equals `nonce`.
    Column `not_judged` says why a row is not sent to the judge ("" if it is):
    a failed generation, a response or task holding either nonce, or (unless
    `judge_truncated`) a response cut at its generator's max_new_tokens (column `truncated`:
    never judged as if complete, counted apart as `TRUNCATED`). Column
    `response_truncated` marks responses cut to fit the judge's context (`cut_to_fit`;
    False for grids that are counted, never sent: the planner's estimate of stand-in
    responses, which would otherwise load the judge's tokenizer at every launch)."""
    from cpt.prompts import judge_messages, load_selected_rubrics
    from cpt.store import content_hash

    rubrics = {r.name: r for r in load_selected_rubrics(cfg)}
    fitter = ResponseFitter(cfg.judge)
    key = nonce_key if nonce_key is not None else secrets.token_bytes(32)
    rows = []
    shared = cfg.prompts.prefix_layout
    for g in responses:
        task = tasks[g["task_id"]]
        for part_rubric, part_level in parts(g):
            nonce = judge_nonce(key, tag, g["id"], part_rubric)
            task_nonce = (
                judge_nonce(key, f"{tag}-task", g["task_id"], part_rubric) if shared else nonce
            )
            rubric = rubrics[part_rubric]
            messages_for = functools.partial(
                judge_messages, cfg.prompts, rubric, task, nonce=nonce, task_nonce=task_nonce
            )
            response, cut = g["text"] or "", False
            if cut_to_fit:
                response, cut = fitter.fit(messages_for, response, (part_rubric, g["task_id"]))
            not_judged = ""
            if g.get("ok") is False:
                not_judged = "generation failed: not judged"
            elif any(n in text for n in (nonce, task_nonce) for text in (response, task)):
                not_judged = "the response or task contains the judge's delimiter nonce: not judged"
            elif g.get("finish_reason") == "length" and not judge_truncated:
                not_judged = TRUNCATED
            rows.append(
                work_row(
                    content_hash([tag, g["id"], part_rubric]),
                    messages_for(response),
                    cfg.seed,
                    gen_id=g["id"],
                    task_id=g["task_id"],
                    rubric=g["rubric"],
                    level=g["level"],
                    part_rubric=part_rubric,
                    part_level=part_level,
                    sample_idx=g["sample_idx"],
                    nonce=nonce,
                    task_nonce=task_nonce,
                    not_judged=not_judged,
                    response_truncated=cut,
                    truncated=g.get("finish_reason") == "length",
                    **meta(g),
                )
            )
    n_cut = sum(r["response_truncated"] for r in rows)
    if n_cut:
        log.warning("judge: %d of %d responses cut to fit the judge's context", n_cut, len(rows))
    return rows


class ResponseFitter:
    """Cuts responses, by the judge's own tokens, so that the judge prompt (instructions,
    rubric, task: never cut) plus `max_new_tokens` fit `max_model_len`.

    The judge's tokenizer is loaded only when a response might not fit (its UTF-8 bytes
    bound its tokens). Without a local tokenizer (a server model) nothing is cut; the
    engine then reports the prompt as too long, a counted failure.
    """

    MARGIN = 16  # tokens: nonces and the cut marker tokenise to slightly different lengths

    def __init__(self, model: Any) -> None:
        self.model = model
        self.limit = model.max_model_len - model.sampling.max_new_tokens - self.MARGIN
        self._overhead: dict[Any, int] = {}

    @functools.cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from cpt.models import resolve_model_path

        try:
            return AutoTokenizer.from_pretrained(
                resolve_model_path(self.model.path, self.model.gguf_file),
                revision=self.model.revision,
                trust_remote_code=bool(self.model.trust_remote_code),
            )
        except Exception as exc:  # a server-only model: no tokenizer here
            log.warning("judge: no tokenizer for %s (%s); long responses are not cut",
                        self.model.path, str(exc).splitlines()[0][:200])  # fmt: skip
            return None

    def fit(
        self, messages_for: Callable[[str], list[dict[str, str]]], response: str, key: Any
    ) -> tuple[str, bool]:
        """(response, cut): the response, or its head with a marker saying it was cut."""
        from cpt.engines.base import fold_system
        from cpt.engines.plaintext import chat_prompt_ids

        around = sum(len(m["content"].encode()) for m in messages_for(""))
        if len(response.encode()) + around + 64 <= self.limit or self.tokenizer is None:
            return response, False
        tok = self.tokenizer
        if key not in self._overhead:
            msgs = fold_system(messages_for(""), self.model.system_role)
            self._overhead[key] = len(chat_prompt_ids(tok, msgs))
        ids = tok(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        room = self.limit - self._overhead[key]
        if len(ids) <= room:
            return response, False
        keep = max(room - 32, 0)  # 32: the marker
        head = tok.decode(ids[:keep], skip_special_tokens=False)
        return f"{head}\n[... cut by cpt: the first {keep} of {len(ids)} tokens shown]", True


def condition_parts(response: dict) -> list[tuple[str, str]]:
    """The (rubric, level) parts of a response's condition ('a+b', 'low|moderate')."""
    return list(zip(response["rubric"].split("+"), response["level"].split("|")))
