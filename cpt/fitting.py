"""Preference rows for training: reading one split, and fitting rows to the token limits
without ever cutting the system prompt.

A pairs folder holds both splits (`split` column); `read_rows` / `select_split` take the
one named, so held-out tasks never reach training by accident.

`fit_example` shortens the user task until the chat-templated prompt fits
`max_prompt_length`, then each response until prompt + response fit `max_length`.
(TRL 1.16 has no `max_prompt_length`; its collator cuts prompt + completion to `max_length`
with `truncation_mode="keep_start"` and drops rows whose prompt alone fills it.)
`prepare_rows` applies it to a table of rows and counts what it cut or dropped. It also
neutralises chat control strings inside message contents (a response holding
`<|im_end|>\n<|im_start|>user` would otherwise become real turns when TRL tokenises the
templated chat): the same `neutralise` the server engines use, counted in the stats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpt.config import TrainConfig
from cpt.engines.base import fold_system
from cpt.engines.plaintext import neutralise, special_strings
from cpt.store import content_hash

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("cpt.train")

REQUIRED_COLUMNS = ("id", "prompt", "chosen", "rejected")


class UnfittableRow(ValueError):
    """A row whose system turn and chat template alone exceed `max_prompt_length`."""


def _n_tokens(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> int:
    # Exactly how TRL 1.16 tokenizes conversational rows (trl.data_utils._tokenize).
    enc = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return len(enc["input_ids"])


def _token_cuts(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """Prefixes of `text` ending on token boundaries: cuts[k] = the first k tokens' text."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends, last = [0], 0
        for _, end in enc["offset_mapping"]:
            last = max(last, end)
            ends.append(last)
        return [text[:e] for e in ends]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]


def _longest_fitting(cuts: list[str], fits: Callable[[str], bool]) -> int:
    """Largest k with fits(cuts[k]) (binary search; fits(cuts[0]) is checked by the caller)."""
    lo, hi = 0, len(cuts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cuts[mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_example(
    prompt: Sequence[dict[str, str]],
    chosen: Sequence[dict[str, str]],
    rejected: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int,
    max_length: int,
    system_role: bool = True,
) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """One preference row as TRL should see it, within the token limits, system turn intact.

    The prompt is folded for models without a system role (`fold_system`), then the last user
    turn (the task) is cut at its end, on a token boundary, until the chat-templated prompt
    (with the generation prompt) has at most `max_prompt_length` tokens. Each response is then
    cut at its end until prompt + response has at most `max_length` tokens (the template still
    closes the turn).

    Returns (prompt, chosen, rejected, info) with info = {prompt_tokens, prompt_truncated,
    chosen_truncated, rejected_truncated}.

    Raises:
        UnfittableRow: if the system turn and template alone exceed `max_prompt_length`.
        ValueError: if the prompt has no user turn or a response is not one assistant turn.
    """
    msgs = [dict(m) for m in prompt]
    task_at = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if task_at is None:
        raise ValueError(f"prompt has no user turn (roles: {[m['role'] for m in msgs]})")
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp or resp[-1]["role"] != "assistant":
            raise ValueError(
                f"{name} must end with an assistant turn, got roles {[m['role'] for m in resp]}"
            )
    task = msgs[task_at]["content"]

    def with_task(text: str) -> list[dict[str, str]]:
        out = [dict(m) for m in msgs]
        out[task_at]["content"] = text
        return fold_system(out, system_role)

    def prompt_fits(text: str) -> bool:
        return _n_tokens(tokenizer, with_task(text), True) <= max_prompt_length

    prompt_truncated = False
    if not prompt_fits(task):
        if not prompt_fits(""):
            bare = _n_tokens(tokenizer, with_task(""), True)
            raise UnfittableRow(
                f"the system turn and chat template alone take {bare} tokens, more than "
                f"train.max_prompt_length={max_prompt_length}; raise max_prompt_length or shorten "
                "the system prompt (cpt never truncates the system turn)"
            )
        cuts = _token_cuts(tokenizer, task)
        task = cuts[_longest_fitting(cuts, prompt_fits)]
        prompt_truncated = True
    final_prompt = with_task(task)

    def fit_response(resp: Sequence[dict[str, str]]) -> tuple[list[dict], bool]:
        resp = [dict(m) for m in resp]
        text = resp[-1]["content"]

        def with_text(t: str) -> list[dict[str, str]]:
            return [*resp[:-1], {**resp[-1], "content": t}]

        def fits(t: str) -> bool:
            return _n_tokens(tokenizer, final_prompt + with_text(t), False) <= max_length

        if fits(text):
            return resp, False
        cuts = _token_cuts(tokenizer, text)
        return with_text(cuts[_longest_fitting(cuts, fits)]), True

    chosen_out, chosen_cut = fit_response(chosen)
    rejected_out, rejected_cut = fit_response(rejected)
    info = {
        "prompt_tokens": _n_tokens(tokenizer, final_prompt, True),
        "prompt_truncated": prompt_truncated,
        "chosen_truncated": chosen_cut,
        "rejected_truncated": rejected_cut,
    }
    return final_prompt, chosen_out, rejected_out, info


def prepare_rows(
    rows: pa.Table, tokenizer: PreTrainedTokenizerBase, cfg: TrainConfig, system_role: bool = True
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows -> TRL rows (prompt, chosen, rejected) fitted by `fit_example`, + stats.

    Rows that cannot fit (system turn too long) are dropped, logged and counted in the stats.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(
            f"preference rows lack column(s) {missing} (have {rows.column_names}); "
            "expected TRL conversational rows: id, prompt, chosen, rejected"
        )
    out, dropped, first_reason = [], [], ""
    stats = {
        "rows": rows.num_rows,
        "prompts_truncated": 0,
        "responses_truncated": 0,
        "max_prompt_tokens": 0,
        "rows_with_control_strings": 0,
    }
    specials = special_strings(tokenizer)

    def plain(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        return [{**m, "content": neutralise(m["content"], specials)} for m in messages]

    for row in rows.select(list(REQUIRED_COLUMNS)).to_pylist():
        cleaned = {k: plain(row[k]) for k in ("prompt", "chosen", "rejected")}
        if any(cleaned[k] != row[k] for k in cleaned):
            stats["rows_with_control_strings"] += 1
            row = {**row, **cleaned}
        try:
            prompt, chosen, rejected, info = fit_example(
                row["prompt"],
                row["chosen"],
                row["rejected"],
                tokenizer,
                max_prompt_length=cfg.max_prompt_length,
                max_length=cfg.max_length,
                system_role=system_role,
            )
        except UnfittableRow as exc:
            dropped.append(row["id"])
            first_reason = first_reason or f"row {row['id']}: {exc}"
            continue
        except ValueError as exc:
            raise ValueError(f"preference row {row['id']!r}: {exc}") from None
        stats["prompts_truncated"] += info["prompt_truncated"]
        stats["responses_truncated"] += info["chosen_truncated"] + info["rejected_truncated"]
        stats["max_prompt_tokens"] = max(stats["max_prompt_tokens"], info["prompt_tokens"])
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    stats["dropped"] = len(dropped)
    stats["dropped_ids"] = dropped[:20]
    if not out:
        raise ValueError(f"no preference row fits: {first_reason}")
    if dropped:  # one line, not one per row: a too-small limit usually hits most rows
        log.warning(
            "train: dropped %d of %d rows that cannot fit train.max_prompt_length=%d (ids %s%s); "
            "first: %s",
            len(dropped), rows.num_rows, cfg.max_prompt_length, dropped[:5],
            ", ..." if len(dropped) > 5 else "", first_reason,
        )  # fmt: skip
    return out, stats


def select_split(rows: pa.Table, split: str | None) -> pa.Table:
    """The rows of one split ("train" or "test", by the `split` column of pairs rows);
    rows without that column, or split None, are taken whole."""
    if split is None or "split" not in rows.column_names:
        return rows
    return rows.filter(pc.equal(rows["split"], split))


def read_rows(paths: Sequence[str | Path], split: str | None) -> pa.Table:
    """The rows of `split` in Parquet files, or folders searched recursively for *.parquet
    (a pairs folder holds both splits: name the one you want)."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no Parquet files under {[str(p) for p in paths]}")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    rows = select_split(table, split)
    if rows.num_rows == 0 and table.num_rows:
        have = sorted(set(table["split"].to_pylist())) if "split" in table.column_names else []
        raise ValueError(
            f"no rows of split {split!r} under {[str(p) for p in paths]} (have {have})"
        )
    return rows


def rows_fingerprint(rows: pa.Table) -> str:
    """Hash of the training-relevant columns (what checkpoints and a finished run belong to)."""
    return content_hash(rows.select(list(REQUIRED_COLUMNS)).to_pylist(), 16)
