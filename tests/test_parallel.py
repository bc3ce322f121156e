"""The sharded runner: deterministic shards, exactly-once rows, resume, replica death."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

from cpt import store
from cpt.parallel import plan_shards, run_sharded


def rows(n: int) -> list[dict]:
    return [{"id": store.content_hash(["row", i]), "x": i} for i in range(n)]


@dataclass(frozen=True)
class Square:
    """A worker factory: picklable, builds its 'engine' once per replica."""

    delay_s: float = 0.0
    die_in: str = ""  # a marker file: the first replica that sees it dies mid-shard

    def __call__(self):
        def work(batch):
            if self.die_in and os.path.exists(self.die_in):
                os.unlink(self.die_in)
                os._exit(1)  # the replica process dies, as on a node failure
            time.sleep(self.delay_s)
            return [{"id": r["id"], "x2": r["x"] ** 2, "pid": os.getpid()} for r in batch]

        return work


def test_plan_shards_is_deterministic_and_covers_every_row_once():
    ids = [r["id"] for r in rows(103)]
    shards = plan_shards(ids, 10)
    assert shards == plan_shards(list(ids), 10)
    assert len(shards) == 11 and sorted(i for s in shards for i in s) == list(range(103))
    assert plan_shards(list(reversed(ids)), 10) != shards or True  # indices move, ids don't
    by_id = [[ids[i] for i in s] for s in shards]
    rev = list(reversed(ids))
    assert [[rev[i] for i in s] for s in plan_shards(rev, 10)] == by_id
    with pytest.raises(ValueError, match="unique"):
        plan_shards(["a", "a"], 1)


def read_all(out, n):
    return store.read_shards(out, n).to_pylist()


def test_inline_run_then_rerun_is_a_noop(tmp_path):
    data = rows(25)
    stats = run_sharded(data, tmp_path, 4, Square(), backend="inline")
    assert (stats.n_shards, stats.rows, stats.shards_skipped) == (7, 25, 0)
    got = read_all(tmp_path, 7)
    assert sorted(r["x2"] for r in got) == sorted(i * i for i in range(25))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}
    again = run_sharded(data, tmp_path, 4, Square(), backend="inline")
    assert again.shards_skipped == 7 and again.rows == 25
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").iterdir()}


def test_stop_then_resume_finishes_exactly_once(tmp_path):
    data = rows(20)
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(store.StoreError, match="unfinished"):
        run_sharded(data, tmp_path, 5, Square(), backend="inline", should_stop=stop_after_two)
    assert len(store.finished_shards(tmp_path, 4)) == 2
    stats = run_sharded(data, tmp_path, 5, Square(), backend="inline")
    assert stats.shards_skipped == 2
    ids = [r["id"] for r in read_all(tmp_path, 4)]
    assert sorted(ids) == sorted(r["id"] for r in data)  # none missing, none duplicated


def test_ray_pool_two_replicas(tmp_path, ray_local):
    data = rows(40)
    stats = run_sharded(data, tmp_path, 5, Square(delay_s=0.2), backend="ray", replicas=2)
    got = read_all(tmp_path, stats.n_shards)
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in data)
    assert len({r["pid"] for r in got}) == 2  # both replicas pulled work


def test_replica_death_retries_the_shard_elsewhere(tmp_path, ray_local):
    marker = tmp_path / "die"
    marker.write_text("x")
    data = rows(12)
    out = tmp_path / "out"
    stats = run_sharded(data, out, 3, Square(die_in=str(marker)), backend="ray", replicas=2)
    assert stats.retried_shards == 1
    assert sorted(r["id"] for r in read_all(out, 4)) == sorted(r["id"] for r in data)


@dataclass(frozen=True)
class Closing:
    """A worker that holds an 'engine' and records when it is closed (as an engine frees
    its GPU memory); it fails on the shard holding row `fail_on`."""

    marker: str
    fail_on: int = -1

    def __call__(self):
        marker, fail_on = self.marker, self.fail_on

        class Work:
            def __call__(self, batch):
                if any(r["x"] == fail_on for r in batch):
                    raise RuntimeError("engine failed")
                return [{"id": r["id"], "x2": r["x"] ** 2} for r in batch]

            def close(self):
                with open(marker, "a") as f:
                    f.write(f"{os.getpid()}\n")

        return Work()


def test_inline_engine_is_closed_after_the_stage_and_after_a_failure(tmp_path):
    marker = tmp_path / "closed"
    run_sharded(rows(10), tmp_path / "a", 5, Closing(str(marker)), backend="inline")
    assert marker.read_text().splitlines() == [str(os.getpid())]
    with pytest.raises(RuntimeError, match="engine failed"):
        run_sharded(rows(10), tmp_path / "b", 5, Closing(str(marker), 7), backend="inline")
    assert len(marker.read_text().splitlines()) == 2


def test_ray_replicas_close_their_engines_at_the_end(tmp_path, ray_local):
    marker = tmp_path / "closed"
    run_sharded(rows(20), tmp_path / "a", 5, Closing(str(marker)), backend="ray", replicas=2)
    closed = marker.read_text().splitlines()
    assert len(closed) == 2 and str(os.getpid()) not in closed  # in each replica's process
