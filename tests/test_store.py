"""cpt.store: atomic writes, shard receipts and checksums, hashing stability, locks."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from cpt import store


def test_content_hash_is_stable_and_order_independent():
    @dataclass
    class C:
        a: int = 1
        b: tuple = ("x", 2.0)

    # pinned: this value must never change silently (it names every stage folder)
    assert store.content_hash({"b": [1, 2], "a": "x"}) == store.content_hash(
        {"a": "x", "b": [1, 2]}
    )
    assert store.content_hash({"a": 1.0}) == store.content_hash({"a": 1})
    assert store.content_hash(C()) == store.content_hash({"a": 1, "b": ["x", 2]})
    assert store.content_hash({"a": "x", "b": [1, 2]}) == "721ef82f2d6c0997"
    assert store.content_hash({"a": 2}) != store.content_hash({"a": 1})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "f.json"
    store.atomic_write_json(p, {"x": 1})
    store.atomic_write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert sorted(os.listdir(p.parent)) == ["f.json"]


def _kill_during_write(path: str) -> None:
    big = b"x" * (64 << 20)
    while True:
        store.atomic_write_bytes(path, big)


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "data.bin"
    store.atomic_write_bytes(target, b"old")
    proc = multiprocessing.get_context("spawn").Process(
        target=_kill_during_write, args=(str(target),)
    )
    proc.start()
    time.sleep(1.5)
    proc.kill()
    proc.join()
    data = target.read_bytes()
    assert data == b"old" or data == b"x" * (64 << 20)  # whole old or whole new, nothing else


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(start, start + n)], "v": list(range(n))})


def test_shard_roundtrip_and_corruption_detected(tmp_path):
    receipt = store.write_shard(tmp_path, 0, _table(5), {"seconds": 1.0})
    store.write_shard(tmp_path, 1, _table(3, 5), {})
    assert receipt["rows"] == 5 and receipt["seconds"] == 1.0
    assert set(store.finished_shards(tmp_path, 2)) == {0, 1}
    # truncate shard 1: it must be detected and removed, never read
    p = store.shard_path(tmp_path, 1)
    p.write_bytes(p.read_bytes()[:-20])
    assert set(store.finished_shards(tmp_path, 2)) == {0}
    assert not p.exists()
    with pytest.raises(store.StoreError, match="part-00001"):
        store.read_shards(tmp_path, 2)


def test_shard_without_receipt_is_unfinished(tmp_path):
    store.write_shard(tmp_path, 0, _table(2), {})
    store.shard_path(tmp_path, 0).with_suffix(".json").unlink()
    assert store.finished_shards(tmp_path, 1) == {}


def test_first_column_must_be_id(tmp_path):
    with pytest.raises(store.StoreError, match="first column must be 'id'"):
        store.write_shard(tmp_path, 0, pa.table({"x": [1]}), {})


def test_read_table_requires_done_marker(tmp_path):
    store.write_shard(tmp_path, 0, _table(2), {})
    with pytest.raises(store.StoreError, match="not finished"):
        store.read_table(tmp_path)
    store.mark_done(tmp_path, {"key": "k", "n_shards": 1})
    assert store.read_table(tmp_path).column("id").to_pylist() == ["r0", "r1"]
    assert store.is_done(tmp_path)


def _hold_lock(path: str, ready, release) -> None:
    with store.stage_lock(Path(path)):
        ready.set()
        release.wait(10)


def test_stage_lock_excludes_a_second_process(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    proc.start()
    assert ready.wait(20)
    with (
        pytest.raises(store.StageLocked, match=r"being written by pid \d+"),
        store.stage_lock(tmp_path),
    ):
        pass
    release.set()
    proc.join()
    with store.stage_lock(tmp_path):  # free again once the holder is gone
        pass


def test_redact_hides_secrets_but_keeps_env_var_names():
    cfg = {
        "engine": {"api_key_env": "OPENAI_API_KEY", "api_key": "sk-123"},
        "hf_token": "hf_abc",
        "x": [{"password": "p"}],
        "empty_token": "",
    }
    out = store.redact(cfg)
    assert out["engine"] == {"api_key_env": "OPENAI_API_KEY", "api_key": "<redacted>"}
    assert out["hf_token"] == "<redacted>" and out["x"][0]["password"] == "<redacted>"
    assert "sk-123" not in json.dumps(out)


def test_no_space_left_gives_a_clear_error(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(store.StoreError, match="no space left"):
        store.atomic_write_bytes(tmp_path / "f", b"data")
    assert os.listdir(tmp_path) == []  # no half file, no temp file


def test_provenance():
    versions = store.package_versions()
    assert "torch" in versions and "pyarrow" in versions
    git = store.git_commit()
    assert set(git) == {"commit", "dirty"}
