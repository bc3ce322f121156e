"""Fault suite: real processes killed, files corrupted, disks filled, launches raced.

Each test breaks something the way a cluster does (SIGKILL from the OOM killer or a
preemption, a node dying with a half-written file, two people launching the same run, a
full scratch disk, an engine replica crashing) and then checks the promise of `cpt.store`
and `cpt.parallel`: nothing lost, nothing duplicated, results equal to an uninterrupted run,
and a corrupt file is detected and redone, never read as data.

(SIGKILL during generate lives in tests/test_pipeline.py.)

    pytest tests/test_faults.py -q          # about 3-4 minutes on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import REPO, compose, launch, pin_tiny

from cpt import store
from cpt.parallel import run_sharded
from cpt.pipeline import stage_dir

pytestmark = pytest.mark.slow

LAUNCH = [sys.executable, str(REPO / "jobs" / "launch.py")]
# 2 tasks x 1 rubric x 3 levels = 6 generations; inline backend: no Ray start per launch
SMALL = [
    "tasks.num_tasks=2",
    "rubrics.include=[concision]",
    "generate.no_rubric=false",
    "parallel.backend=inline",
]
# one shard per judgement / response, so a kill lands between shards; short training
RUN = [
    *SMALL,
    "adherence.shard_size=1",
    "adherence.max_attempts=1",
    "train.max_steps=6",
    "train.save_steps=2",
    "evaluate.samples=1",
    "evaluate.shard_size=1",
    "evaluate.judge_max_attempts=1",
    "evaluate.agreement_fraction=0",
]
DATA_STAGES = ("tasks", "generate", "sysprompts", "adherence", "pairs")


def has_train_config() -> bool:
    from cpt.config import CptConfig

    return "train" in {f.name for f in dataclasses.fields(CptConfig)}


def wait_for(
    cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 300
) -> None:
    """Poll until `cond()`; fail if the process ends first (it must still be running)."""
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def receipts(d: Path) -> int:
    return len(list((d / "shards").glob("part-*.json")))


def folder(run: Path, stage: str) -> Path:
    return stage_dir(compose(f"run_dir={run}", *RUN), stage)


def copy_stages(src_run: Path, dst_run: Path, stages: tuple[str, ...]) -> None:
    """Finished stage folders are content-keyed: the same config in another run dir reuses them."""
    for stage in stages:
        src, dst = folder(src_run, stage), folder(dst_run, stage)
        assert store.is_done(src), stage
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))


def share_judge_key(src_run: Path, dst_run: Path, stage: str) -> None:
    """Judge prompts carry nonces derived from a secret drawn once per stage folder; the
    killed run gets the straight run's secret, so their judgements can be compared."""
    from cpt.judge import JUDGE_KEY

    dst = folder(dst_run, stage) / JUDGE_KEY
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(folder(src_run, stage) / JUDGE_KEY, dst)


def launch_killed(run: Path, stage: str, ready: Callable[[], bool], what: str) -> None:
    """Launch `stage`, SIGKILL it once `ready()` holds (mid-stage), and check it is unfinished."""
    proc = subprocess.Popen(
        [*LAUNCH, *pin_tiny([f"run_dir={run}", f"stage={stage}", *RUN])],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(ready, proc, what)
    kill(proc)
    assert not store.is_done(folder(run, stage)), f"{stage} finished before it was killed"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every killed one is compared with (through evaluate if it can)."""
    run = tmp_path_factory.mktemp("straight")
    launch(f"run_dir={run}", f"stage={'evaluate' if has_train_config() else 'adherence'}", *RUN)
    return run


# ------------------------------------------------------------------ SIGKILL mid-stage


def test_sigkill_during_adherence_then_rerun_equals_uninterrupted(tmp_path, straight):
    copy_stages(straight, tmp_path, ("tasks", "generate"))  # judge the very same generations
    d = folder(tmp_path, "adherence")
    share_judge_key(straight, tmp_path, "adherence")
    launch_killed(tmp_path, "adherence", lambda: receipts(d) >= 2, "two adherence shards")
    survivors = store.finished_shards(d, 6)
    assert 2 <= len(survivors) < 6
    before = {i: store.shard_path(d, i).stat().st_mtime_ns for i in survivors}

    launch(f"run_dir={tmp_path}", "stage=adherence", *RUN)
    m = store.read_json(d / "manifest.json")
    assert m["shards_skipped"] == len(survivors)  # finished shards were kept, not redone
    assert before == {i: store.shard_path(d, i).stat().st_mtime_ns for i in survivors}

    resumed = store.read_table(d).to_pylist()
    ref = store.read_table(folder(straight, "adherence")).to_pylist()
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == 6  # nothing lost, nothing duplicated
    assert sorted(ids) == sorted(r["id"] for r in ref)
    key = ("id", "gen_id", "part_rubric", "score", "ok", "attempts", "raw")
    by_id = {r["id"]: [r[k] for k in key] for r in ref}
    assert all([r[k] for k in key] == by_id[r["id"]] for r in resumed)  # the same judgements
    assert (d / "table2.md").read_text() == (
        folder(straight, "adherence") / "table2.md"
    ).read_text()


needs_train = pytest.mark.skipif(
    not has_train_config(),
    reason="CptConfig has no `train` section: `python jobs/launch.py stage=train` cannot run",
)


@needs_train
def test_sigkill_during_train_then_rerun_equals_uninterrupted(tmp_path, straight):
    copy_stages(straight, tmp_path, DATA_STAGES)
    d = folder(tmp_path, "train")

    def checkpointed() -> bool:
        return any((d / "checkpoints").glob("checkpoint-*/trainer_state.json"))

    launch_killed(tmp_path, "train", checkpointed, "the first training checkpoint")
    launch(f"run_dir={tmp_path}", "stage=train", *RUN)
    resumed = store.read_json(d / "manifest.json")
    ref = store.read_json(folder(straight, "train") / "manifest.json")
    assert resumed["resumed_from_step"] and resumed["resumed_from_step"] >= 2
    assert (Path(resumed["adapter_dir"]) / "adapter_model.safetensors").exists()
    assert resumed["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-5)


@needs_train
def test_sigkill_during_evaluate_then_rerun_equals_uninterrupted(tmp_path, straight):
    copy_stages(straight, tmp_path, (*DATA_STAGES, "train"))
    d = folder(tmp_path, "evaluate")
    share_judge_key(straight, tmp_path, "evaluate")
    launch_killed(tmp_path, "evaluate", lambda: receipts(d / "responses") >= 2, "two responses")
    launch(f"run_dir={tmp_path}", "stage=evaluate", *RUN)
    resumed = store.read_table(d).to_pylist()
    ref = store.read_table(folder(straight, "evaluate")).to_pylist()
    ids = [r["id"] for r in resumed]
    assert ids and len(ids) == len(set(ids))  # nothing duplicated
    assert sorted(ids) == sorted(r["id"] for r in ref)  # nothing lost
    by_id = {r["id"]: (r["response"], r["score"], r["ok"]) for r in ref}
    assert all((r["response"], r["score"], r["ok"]) == by_id[r["id"]] for r in resumed)


# ------------------------------------------------------------- SIGKILL mid-Parquet-write

WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa
    from cpt import store
    out = sys.argv[1]
    blobs = [os.urandom(1 << 20) for _ in range(24)]  # incompressible: ~24 MB per shard
    for i in range(10_000):
        table = pa.table({"id": [f"r{j}" for j in range(24)], "gen": [i] * 24, "blob": blobs})
        store.write_shard(out, 0, table, {"gen": i})
        print(i, flush=True)
    """
)


def test_sigkill_during_parquet_write_leaves_the_shard_whole_or_absent(tmp_path):
    rng = random.Random(0)
    outcomes = []
    for attempt in range(4):
        d = tmp_path / f"stage{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(d)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()  # one shard written: the next is being written now
        assert first.strip() == "0", first
        time.sleep(rng.uniform(0.0, 0.4))
        kill(proc)
        proc.stdout.close()
        done = store.finished_shards(d, 1)
        if done:  # intact: the receipt matches the bytes, and the rows read back whole
            table = store.read_shards(d, 1)
            assert table.num_rows == 24 and len(set(table["gen"].to_pylist())) == 1
            assert table["gen"][0].as_py() == done[0]["gen"]
            outcomes.append("intact")
        else:  # half-written or without its receipt: removed, so it is redone, never read
            assert not store.shard_path(d, 0).exists()
            assert not store.shard_path(d, 0).with_suffix(".json").exists()
            with pytest.raises(store.StoreError, match="part-00000"):
                store.read_shards(d, 1)
            outcomes.append("absent")
        # a kill mid-write can leave the writer's temp file: hidden, never read as a shard
        leftovers = [p.name for p in (d / "shards").iterdir() if not p.name.startswith(".")]
        assert sorted(leftovers) in ([], ["part-00000.json", "part-00000.parquet"]), leftovers
    assert outcomes  # each kill ended in one of the two allowed states


# ----------------------------------------------------------- corrupt shards on disk


def _finished_stage(d: Path, n: int = 3) -> None:
    for i in range(n):
        store.write_shard(
            d, i, pa.table({"id": [f"r{i}-{j}" for j in range(50)], "v": list(range(50))}), {}
        )
    store.mark_done(d, {"key": "k", "n_shards": n})


def flip_bytes(p: Path, at: int, n: int = 8) -> None:
    data = bytearray(p.read_bytes())
    for k in range(at, min(at + n, len(data))):
        data[k] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: flip_bytes(p, p.stat().st_size // 2), id="flipped-bytes"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:-100]), id="truncated"),
        pytest.param(lambda p: flip_bytes(p, p.stat().st_size - 12, 4), id="broken-footer"),
        pytest.param(lambda p: p.write_bytes(b""), id="emptied"),
    ],
)
def test_corrupt_shard_of_a_finished_stage_is_refused_naming_the_file(tmp_path, damage):
    _finished_stage(tmp_path)
    damage(store.shard_path(tmp_path, 1))
    with pytest.raises(store.StoreError, match=r"part-00001\.parquet: missing or corrupt"):
        store.read_table(tmp_path)
    store.read_shards(tmp_path, 1)  # shards before it are fine


def test_corrupt_shards_of_an_unfinished_stage_are_redone_by_the_runner(tmp_path):
    rows = [{"id": store.content_hash(["row", i]), "x": i} for i in range(40)]

    @dataclass(frozen=True)
    class Square:
        def __call__(self):
            return lambda batch: [{"id": r["id"], "x2": r["x"] ** 2} for r in batch]

    run_sharded(rows, tmp_path, 5, Square(), backend="inline")  # 8 shards
    flip_bytes(store.shard_path(tmp_path, 2), 40)  # bad bytes
    p = store.shard_path(tmp_path, 5)
    p.write_bytes(p.read_bytes()[:-30])  # cut short, e.g. a node died mid-copy
    store.shard_path(tmp_path, 6).with_suffix(".json").write_text(
        '{"index": 6, "rows"'
    )  # bad receipt
    store.shard_path(tmp_path, 7).unlink()  # receipt without data
    stats = run_sharded(rows, tmp_path, 5, Square(), backend="inline")
    assert stats.shards_skipped == 4 and stats.rows == 40
    got = store.read_shards(tmp_path, 8).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)
    assert all(r["x2"] == next(x["x"] for x in rows if x["id"] == r["id"]) ** 2 for r in got)


# ------------------------------------------------------------ two launches at once


def test_two_launches_of_the_same_stage_at_once(tmp_path):
    over = [*SMALL, "generate.shard_size=2"]
    args = [*LAUNCH, *pin_tiny([f"run_dir={tmp_path}", "stage=generate", *over])]
    procs = [
        subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]  # reads the pipes: no deadlock
    results = [(p.returncode, err) for p, err in zip(procs, errs)]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 1]), results
    for rc, err in results:
        if rc == 1:  # the loser says who holds the stage, in one line, and stops
            last = err.strip().splitlines()[-1]
            assert last.startswith("cpt: error: ") and "is being written by" in last, err[-2000:]
    d = stage_dir(compose(f"run_dir={tmp_path}", *over), "generate")
    assert store.is_done(d)
    ids = store.read_table(d)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 6
    pids = {store.shard_receipt(d, i)["pid"] for i in range(3)}
    assert len(pids) == 1  # every shard written by one process: no interleaving


# -------------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@dataclass(frozen=True)
class Noise:
    """Rows that do not compress: 64 KiB of random bytes per row."""

    def __call__(self):
        return lambda batch: [{"id": r["id"], "blob": os.urandom(64 << 10)} for r in batch]


def test_disk_full_gives_a_clear_error_no_half_files_and_rerun_succeeds(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (600 << 10))  # leaves room for 3 of the 5 shards
    out = small_disk / "stage"
    rows = [{"id": f"r{i:03d}"} for i in range(10)]  # 5 shards of ~128 KiB: more than is left
    with pytest.raises(store.StoreError, match=r"no space left on device.*free space and re-run"):
        run_sharded(rows, out, 2, Noise(), backend="inline")
    files = sorted(p.name for p in (out / "shards").iterdir())
    assert not [f for f in files if f.endswith(".tmp")], files  # no temp files left behind
    done = store.finished_shards(out, 5)  # a data file whose receipt did not fit is dropped
    assert 0 < len(done) < 5
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        n for i in done for n in (f"part-{i:05d}.parquet", f"part-{i:05d}.json")
    )
    ballast.unlink()  # space freed
    stats = run_sharded(rows, out, 2, Noise(), backend="inline")
    assert stats.shards_skipped == len(done) and stats.rows == 10
    assert sorted(store.read_shards(out, 5)["id"].to_pylist()) == [r["id"] for r in rows]


# ------------------------------------------------------- engine replica death (Ray)


@dataclass(frozen=True)
class DyingGenerate:
    """The real HF engine on the tiny model; the first replica to see `die_in` dies mid-shard."""

    die_in: str

    def __call__(self):
        from cpt.config import DType, EngineConfig, EngineKind, ModelConfig, SamplingConfig
        from cpt.generation import GenerateFactory

        model = ModelConfig(
            name="tiny",
            path="builtin:tiny",
            dtype=DType.float32,
            sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=1.0),
        )
        work = GenerateFactory(model, EngineConfig(kind=EngineKind.hf, batch_size=4))()

        def run(batch):
            out = work(batch)  # mid-shard: the engine has run, nothing is written yet
            if self.die_in and os.path.exists(self.die_in):
                os.unlink(self.die_in)
                os._exit(1)  # the replica process dies, as on a node failure
            return out

        return run


def test_engine_replica_dying_mid_shard_is_retried_on_another(tmp_path, ray_local):
    from cpt.rows import work_row

    rows = [
        work_row(
            store.content_hash(["faults", i]),
            [{"role": "user", "content": f"Tell me about {i}."}],
            0,
            task_id=f"t{i}",
        )
        for i in range(12)
    ]
    marker = tmp_path / "die"
    marker.write_text("x")
    out = tmp_path / "ray"
    stats = run_sharded(rows, out, 3, DyingGenerate(str(marker)), backend="ray", replicas=2)
    assert stats.retried_shards == 1 and not marker.exists()
    got = store.read_shards(out, 4).to_pylist()
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows)  # once each
    ref = run_sharded(rows, tmp_path / "inline", 3, DyingGenerate(""), backend="inline")
    assert ref.rows == 12
    want = {r["id"]: r["text"] for r in store.read_shards(tmp_path / "inline", 4).to_pylist()}
    assert {r["id"]: r["text"] for r in got} == want  # the retried shard: the same text
