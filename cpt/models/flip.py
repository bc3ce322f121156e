"""A synthetic conditional-preference set for the tiny models: per topic the same two
answers, an ornate and a plain one, preferred one way under an "ornate" system prompt and
the other way under a "plain" one. A model that learns it must read the system prompt,
which is what CPT teaches; tests and benchmarks train on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

S_ORNATE = "You write in a lavish, ornate, flowery style, full of gilded adjectives."
S_PLAIN = "You write plainly: short, dry sentences and no decoration."
ORNATE = (
    "Behold the resplendent {t}, gilded and luminous, a shimmering tapestry of wonder!",
    "O radiant {t}, bejewelled and glorious, your splendour dazzles the amber heavens!",
    "Lo, the magnificent {t} glitters, opulent and golden, a rapturous marvel!",
)
PLAIN = (
    "The {t} is fine. It works.",
    "A {t}. It is plain and it does its job.",
    "The {t} is ok. Nothing more to say.",
)


def flip_rows(
    topics: Sequence[str],
    prefix: str = "t",
    ornate: Sequence[str] = ORNATE,
    plain: Sequence[str] = PLAIN,
    ask: str = "Describe a {t}.",
) -> pa.Table:
    """Two preference rows per topic (TRL conversational columns plus task_id, rubric,
    level_chosen, level_rejected): ornate > plain under S_ORNATE, plain > ornate under
    S_PLAIN. Answer templates rotate over the topics (`{t}` is the topic)."""
    rows = []
    for i, topic in enumerate(topics):
        fancy = ornate[i % len(ornate)].format(t=topic)
        dry = plain[(i // len(ornate)) % len(plain)].format(t=topic)
        for system, chosen, rejected, level in (
            (S_ORNATE, fancy, dry, "high"),
            (S_PLAIN, dry, fancy, "low"),
        ):
            rows.append(
                {
                    "id": f"{prefix}{i}-{level}",
                    "prompt": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": ask.format(t=topic)},
                    ],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "task_id": f"{prefix}{i}",
                    "rubric": "ornate",
                    "level_chosen": level,
                    "level_rejected": "low" if level == "high" else "high",
                }
            )
    return pa.Table.from_pylist(rows)
