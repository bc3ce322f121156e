"""pairs: generations + system prompts -> conditional preference rows, both directions.
For every (task, rubric) and every two distinct levels l1 < l2 with responses y1, y2 (same
sample index): (s(l1), x, chosen y1, rejected y2) and (s(l2), x, chosen y2, rejected y1).
Optional adherence filter: keep a pair only if the judge ordered y1, y2 as intended by at
least `min_margin` points. The split follows tasks/ (no task in both).
Reads tasks/, generate/, sysprompts/, adherence/; writes pairs/ shard 0 = train, shard 1 =
test, in TRL's conversational format (prompt = [system, user], chosen/rejected =
[assistant]), and README.md, a dataset card with counts and filter statistics.
Run alone: python jobs/launch.py stage=pairs
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from cpt import store
from cpt.config import CptConfig
from cpt.graph import StageContext, StageSpec
from cpt.importers import import_pairs
from cpt.prompts import fill
from cpt.system_prompts import load_system_prompts, pick

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("task_id", pa.string()),
        ("rubric", pa.string()),
        ("level_chosen", pa.string()),
        ("level_rejected", pa.string()),
        ("sample_idx", pa.int64()),
        ("split", pa.string()),
        ("system_prompt", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
    ]
)


def params(cfg: CptConfig) -> dict[str, Any]:
    src = cfg.pairs.source
    return {
        "source": source_fingerprint(src.path) if src.path else "",
        "test_fraction": cfg.tasks.test_fraction if src.path else None,
        "pairs": cfg.pairs,
        "levels": cfg.levels.names,
        "template": cfg.prompts.student,
        "seed": cfg.seed,
    }


def level_rank(cfg: CptConfig, level_key: str) -> tuple[int, ...]:
    names = cfg.levels.names
    return tuple(names.index(lv) for lv in level_key.split("|"))


def intended_order(
    cfg: CptConfig, scores: dict[tuple[str, str], float | None], g_lo: dict, g_hi: dict
) -> bool | None:
    """Did the judge order the two responses as their levels say, by `min_margin`?

    None when a needed judgement is missing (failed): such pairs are dropped and counted.
    For compositions every rubric whose level differs must be ordered as intended.
    """
    lo_levels, hi_levels = g_lo["level"].split("|"), g_hi["level"].split("|")
    for part, (a, b) in zip(g_lo["rubric"].split("+"), zip(lo_levels, hi_levels)):
        if a == b:
            continue
        s_a, s_b = scores.get((g_lo["id"], part)), scores.get((g_hi["id"], part))
        if s_a is None or s_b is None:
            return None
        sign = 1 if cfg.levels.names.index(a) < cfg.levels.names.index(b) else -1
        if sign * (s_b - s_a) < cfg.pairs.min_margin:
            return False
    return True


def build_pairs(
    cfg: CptConfig,
    tasks: list[dict],
    gens: list[dict],
    sysprompts: dict[tuple[str, str], list[str]],
    scores: dict[tuple[str, str], float | None] | None,
) -> tuple[list[dict], Counter]:
    """Preference rows (both directions) and counters of what was kept and dropped."""
    by_task = {t["id"]: t for t in tasks}
    stats: Counter = Counter()
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for g in gens:
        if g["kind"] != "rubric":
            continue
        if not g["ok"] or not (g["text"] or "").strip():
            stats["dropped_failed_generation"] += 1
            continue
        if g.get("finish_reason") == "length" and not cfg.pairs.keep_truncated:
            stats["dropped_truncated_generation"] += 1  # cut at max_new_tokens: incomplete
            continue
        groups.setdefault((g["task_id"], g["rubric"], g["sample_idx"]), []).append(g)
    rows = []
    for (task_id, rubric, sample_idx), members in sorted(groups.items()):
        task = by_task[task_id]
        members.sort(key=lambda g: level_rank(cfg, g["level"]))
        for lo, hi in itertools.combinations(members, 2):
            if scores is not None:
                verdict = intended_order(cfg, scores, lo, hi)
                if verdict is None:
                    stats["dropped_unjudged"] += 1
                    continue
                if not verdict:
                    stats["dropped_by_adherence_filter"] += 1
                    continue
            for chosen, rejected in ((lo, hi), (hi, lo)):
                system = pick(
                    sysprompts[(rubric, chosen["level"])],
                    task_id,
                    rubric,
                    chosen["level"],
                    cfg.seed,
                )
                rid = store.content_hash(
                    ["pair", task_id, rubric, chosen["level"], rejected["level"], sample_idx]
                )
                rows.append(
                    {
                        "id": rid,
                        "task_id": task_id,
                        "rubric": rubric,
                        "level_chosen": chosen["level"],
                        "level_rejected": rejected["level"],
                        "sample_idx": sample_idx,
                        "split": task["split"],
                        "system_prompt": system,
                        "prompt": [
                            {"role": "system", "content": system},
                            {
                                "role": "user",
                                "content": fill(cfg.prompts.student, task=task["text"]),
                            },
                        ],
                        "chosen": [{"role": "assistant", "content": chosen["text"]}],
                        "rejected": [{"role": "assistant", "content": rejected["text"]}],
                    }
                )
                stats[f"rows_{task['split']}"] += 1
    return rows, stats


def dataset_card(cfg: CptConfig, rows: list[dict], stats: Counter, fallbacks: int) -> str:
    counts = Counter(
        (r["split"], r["rubric"], r["level_chosen"], r["level_rejected"]) for r in rows
    )
    lines = [
        "# CPT preference pairs",
        "",
        "Conversational preference rows (TRL format): `prompt` = [system s(R, level), "
        "user task], `chosen` / `rejected` = [assistant]. Every pair of levels appears in "
        "both directions, each under the system prompt of its chosen level.",
        "",
        'Load: `datasets.load_dataset("parquet", data_files={"train": '
        '"shards/part-00000.parquet", "test": "shards/part-00001.parquet"})`',
        "",
        f"- adherence filter: {'min_margin=' + str(cfg.pairs.min_margin) if cfg.pairs.filter else 'off'}",
        *[f"- {k}: {v}" for k, v in sorted(stats.items())],
        f"- system prompts replaced by the fallback (teacher returned nothing): {fallbacks}",
        "",
        "| split | rubric | chosen level | rejected level | rows |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {r} | {a} | {b} | {n} |" for (s, r, a, b), n in sorted(counts.items())]
    return "\n".join(lines) + "\n"


def source_fingerprint(path: str) -> str:
    """Content hash of an imported file or folder: new data, new pairs folder."""
    root = Path(path).expanduser()
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    return store.content_hash(
        [[f.name, store.file_sha256(f)] for f in files if f.exists()] or [path]
    )


def import_run(ctx: StageContext) -> dict[str, Any]:
    """Released pairs (`pairs.source`) -> the same two shards the built pairs have."""
    cfg = ctx.cfg
    rows = import_pairs(cfg.pairs.source, cfg.pairs.columns, cfg.tasks.test_fraction, cfg.seed)
    for index, split in enumerate(("train", "test")):
        part = [r for r in rows if r["split"] == split]
        store.write_shard(ctx.out_dir, index, pa.Table.from_pylist(part, schema=SCHEMA), {})
    n = Counter(r["split"] for r in rows)
    store.atomic_write_text(
        ctx.out_dir / "README.md",
        "# CPT preference pairs (imported)\n\n"
        f"From `{cfg.pairs.source.path}` (split {cfg.pairs.source.split!r}), split by task: "
        f"{n['train']} train rows, {n['test']} test rows.\n",
    )
    return {"rows": len(rows), "n_shards": 2, "imported_from": cfg.pairs.source.path, **n}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    if cfg.pairs.source.path:
        return import_run(ctx)
    tasks = store.read_table(ctx.inputs["tasks"]).to_pylist()
    gens = store.read_table(
        ctx.inputs["generate"],
        ["id", "task_id", "rubric", "level", "sample_idx", "kind", "text", "ok", "finish_reason"],
    ).to_pylist()
    sysprompts, fallbacks = load_system_prompts(cfg, ctx.inputs["sysprompts"])
    scores = None
    if cfg.pairs.filter:
        adh = store.read_table(
            ctx.inputs["adherence"], ["gen_id", "part_rubric", "score", "ok"]
        ).to_pylist()
        scores = {(a["gen_id"], a["part_rubric"]): (a["score"] if a["ok"] else None) for a in adh}
    rows, stats = build_pairs(cfg, tasks, gens, sysprompts, scores)
    for index, split in enumerate(("train", "test")):
        part = [r for r in rows if r["split"] == split]
        store.write_shard(ctx.out_dir, index, pa.Table.from_pylist(part, schema=SCHEMA), {})
    store.atomic_write_text(ctx.out_dir / "README.md", dataset_card(cfg, rows, stats, fallbacks))
    return {"rows": len(rows), "n_shards": 2, "sysprompt_fallbacks": fallbacks, **stats}


def plan(cfg: CptConfig) -> dict[str, Any]:
    if cfg.pairs.source.path:
        return {"import": cfg.pairs.source.path}
    return {"filter": cfg.pairs.filter}


def skip(cfg: CptConfig) -> tuple[str, ...]:
    """Imported pairs need none of this run's data stages."""
    return ("tasks", "generate", "sysprompts", "adherence") if cfg.pairs.source.path else ()


SPEC = StageSpec(
    "pairs", ("tasks", "generate", "sysprompts", "adherence"), params, run, plan, skip=skip
)
