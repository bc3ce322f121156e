"""Finished rows of an interrupted shard survive: a SIGKILL in the middle of a large shard
costs only the rows that had not finished (part-files inside the shard, `part_rows`).

    pytest tests/test_subshard.py -q
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

from cpt import store
from cpt.parallel import parts_dir, run_sharded

ROWS, PART = 64, 8

RUNNER = """
import json, sys, time
from pathlib import Path
from cpt.parallel import run_sharded

out, log, block_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def factory():
    calls = 0
    def work(rows):
        nonlocal calls
        calls += 1
        if calls == block_at:  # the part in flight when the kill comes
            time.sleep(3600)
        with open(log, "a") as f:
            f.write("".join(r["id"] + "\\n" for r in rows))
        return [{"id": r["id"], "text": r["x"] * 2} for r in rows]
    return work

rows = [{"id": f"r{i:03d}", "x": f"<{i}>"} for i in range(ROWS)]
stats = run_sharded(rows, out, ROWS, factory, backend="inline", part_rows=PART)
print("STATS", json.dumps(stats.as_dict()))
"""


def _run(out: Path, log: Path, block_at: int) -> subprocess.Popen:
    code = RUNNER.replace("ROWS", str(ROWS)).replace("PART", str(PART))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(out), str(log), str(block_at)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigkill_mid_shard_recomputes_only_unfinished_rows(tmp_path):
    out, log = tmp_path / "out", tmp_path / "computed.txt"
    proc = _run(out, log, block_at=4)  # parts 1-3 finish, part 4 hangs
    parts = parts_dir(out, 0)
    while len(list(parts.glob("b-*.parquet"))) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.shard_receipt(out, 0) is None  # the shard itself is not done
    first = log.read_text().split()
    log.unlink()

    proc = _run(out, log, block_at=0)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stats = json.loads(stdout.split("STATS ", 1)[1])
    recomputed = log.read_text().split()
    print(f"\nsub-shard resume: killed after {len(first)} of {ROWS} rows; "
          f"re-run recomputed {len(recomputed)} rows (whole shard before: {ROWS})")  # fmt: skip
    assert len(first) == 3 * PART and stats["rows_reused"] == 3 * PART
    assert len(recomputed) == ROWS - 3 * PART and not set(recomputed) & set(first)
    table = store.read_shards(out, 1).to_pylist()
    assert [r["id"] for r in table] == [f"r{i:03d}" for i in range(ROWS)]  # exactly once
    assert all(r["text"] == f"<{int(r['id'][1:])}>" * 2 for r in table)
    assert not parts.exists()  # the part-files go once the shard is written


def test_parts_of_another_plan_are_not_reused(tmp_path):
    """A part-file whose row ids differ (the shard was cut differently) is redone."""
    calls: list[int] = []

    def factory():
        def work(rows):
            calls.append(len(rows))
            return [{"id": r["id"], "v": 1} for r in rows]

        return work

    rows = [{"id": f"r{i}"} for i in range(6)]
    stale = parts_dir(tmp_path, 0) / "b-00000.parquet"
    import pyarrow as pa

    store.atomic_write_parquet(stale, pa.table({"id": ["zz", "yy"], "v": [9, 9]}))
    stats = run_sharded(rows, tmp_path, 6, factory, backend="inline", part_rows=2)
    assert calls == [2, 2, 2] and stats.rows_reused == 0
    assert {r["v"] for r in store.read_shards(tmp_path, 1).to_pylist()} == {1}
