"""A work row for the parallel runner: its id, the chat as JSON, a per-row seed and the
columns carried to the output. Generation, judging and every stage build rows here.
"""

from __future__ import annotations

import json
from typing import Any

from cpt.parallel import Row
from cpt.store import content_hash


def row_seed(base_seed: int, row_id: str) -> int:
    """A per-row sampling seed: stable for the row, different between rows."""
    return int(content_hash([base_seed, row_id], 8), 16) & 0x7FFFFFFF


def work_row(row_id: str, messages: list[dict[str, str]], seed: int, **meta: Any) -> Row:
    return {
        "id": row_id,
        "messages": json.dumps(messages, ensure_ascii=False),
        "seed": row_seed(seed, row_id),
        **meta,
    }
