"""Sharded parallel runner: work grid -> deterministic shards -> workers -> Parquet shards.

The rows of a stage's work grid carry stable ids. They are cut into shards by sorting on
the id (ids are content hashes, so long and short prompts mix evenly) and chunking; the
same grid always gives the same shards. Workers (Ray actors, each holding one engine
replica) pull shards one at a time from a queue; each finished shard is written atomically
by the worker as one Parquet file plus a receipt. A re-run skips shards whose receipt and
checksum are intact and redoes the rest, so a killed run finishes with exactly-once rows.

A worker is any callable `rows -> output rows` built by a picklable factory, so the
runner knows nothing about engines or stages.

Inside a shard, progress is kept too: with `part_rows`, the worker gets the shard's rows in
parts of that many rows and each finished part is written at once (atomically) as a
part-file under `shards/.parts-<shard>/`. A shard killed half-way (SIGKILL, preemption, a
node lost) keeps its finished parts; its re-run recomputes only the rest (counted as
`rows_reused`), then writes the shard and drops the part-files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cpt import store
from cpt.replicas import ReplicaPool, Resources, init_ray, replica_count
from cpt.warm import Held, WarmEngines

log = logging.getLogger(__name__)

Row = dict[str, Any]
Worker = Callable[[list[Row]], list[Row]]
WorkerFactory = Callable[[], Worker]

MAX_SHARD_ATTEMPTS = 3  # a shard whose worker died is retried on another replica
WAIT_S = 5.0  # how often the driver checks that the Ray head still answers
HEAD_LOST_S = 20.0  # then it stops, before Ray's own 60 s limit ends it without a word


CPU_ONLY = Resources()  # one CPU per replica, no GPU


class RaySessionLost(store.StoreError):
    """The Ray cluster (its head) went away under a running stage."""


@dataclass
class RunStats:
    n_shards: int
    shards_skipped: int
    rows: int
    seconds: float
    tokens: int
    failures: int
    retried_shards: int
    rows_reused: int = 0  # rows of interrupted shards kept from their part-files
    prompt_tokens: int = 0
    shard_seconds: float = 0.0  # the shards' own times: `seconds` less engine start-up
    cached_tokens: int = 0  # of prompt_tokens, served from a prefix cache (row column dropped)
    prefix_cache: dict[str, Any] = field(default_factory=dict)  # hit_rate (generation.run_rows)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def plan_shards(ids: Sequence[str], shard_size: int) -> list[list[int]]:
    """Row indices of each shard: rows sorted by id, then cut every `shard_size` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if len(set(ids)) != len(ids):
        raise ValueError("row ids must be unique to shard a work grid")
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [order[i : i + shard_size] for i in range(0, len(order), shard_size)]


def _valid_text(value: Any) -> Any:
    """Model text is data: lone surrogates (from JSON escapes or bad bytes) cannot be stored
    as UTF-8, so they become U+FFFD instead of failing the whole shard."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def _table(rows: list[Row]) -> pa.Table:
    rows = [{k: _valid_text(v) for k, v in r.items()} for r in rows]
    return pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string())})


def write_rows(out_dir: Path, index: int, rows: list[Row], stats: dict[str, Any]) -> dict:
    """One shard from output rows (the first key of each row must be `id`)."""
    stats = {
        **stats,
        "tokens": sum(int(r.get("completion_tokens", 0) or 0) for r in rows),
        "prompt_tokens": sum(int(r.get("prompt_tokens", 0) or 0) for r in rows),
        "failures": sum(1 for r in rows if r.get("ok") is False),
        "cached_tokens": sum(int(r.pop("cached_tokens", 0) or 0) for r in rows),  # how, not what
    }
    return store.write_shard(out_dir, index, _table(rows), stats)


def parts_dir(out_dir: Path, index: int) -> Path:
    """Where the finished parts of unfinished shard `index` wait."""
    return Path(out_dir) / "shards" / f".parts-{index:05d}"


def _read_part(path: Path, ids: list[str]) -> list[Row] | None:
    """The rows of a finished part whose input ids are `ids`, or None (redo it)."""
    if not path.exists():
        return None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception:  # cut short on a full disk, or not ours: redo the part
        rows = None
    if rows is None or [r.get("id") for r in rows] != ids:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    return rows


def process_shard(
    worker: Worker,
    out_dir: Path,
    index: int,
    rows: list[Row],
    part_rows: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> dict | None:
    """Run one shard and write it; with `part_rows`, part by part (see the module
    docstring). None if `should_stop()` turned true between parts (the parts are kept)."""
    started = time.time()
    size = part_rows if 0 < part_rows < len(rows) else len(rows)
    pdir = parts_dir(out_dir, index)
    out: list[Row] = []
    reused = 0
    for k, start in enumerate(range(0, len(rows), size or 1)):
        batch = rows[start : start + size]
        path = pdir / f"b-{k:05d}.parquet"
        kept = _read_part(path, [r["id"] for r in batch]) if size < len(rows) else None
        if kept is not None:
            reused += len(kept)
        else:
            if out and should_stop and should_stop():
                return None
            kept = worker(batch)
            if size < len(rows):
                store.atomic_write_parquet(path, _table(kept))
        out += kept
    receipt = write_rows(
        out_dir,
        index,
        out,
        {
            "seconds": round(time.time() - started, 3),
            "host": os.uname().nodename,
            "pid": os.getpid(),
            "rows_reused": reused,
        },
    )
    shutil.rmtree(pdir, ignore_errors=True)
    return receipt


class _Progress:
    """A progress bar on a terminal; a log line every `every_s` seconds otherwise (Slurm)."""

    def __init__(self, total: int, done: int, every_s: float, label: str):
        self.total, self.done, self.every_s, self.label = total, done, every_s, label
        self.rows = self.tokens = 0
        self.start = self.last = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, unit="shard")

    def update(self, receipt: dict) -> None:
        self.done += 1
        self.rows += receipt["rows"]
        self.tokens += receipt.get("tokens", 0)
        dt = max(time.time() - self.start, 1e-9)
        rates = f"{self.rows / dt:.1f} rows/s, {self.tokens / dt:.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
            self.bar.update(1)
        elif time.time() - self.last >= self.every_s or self.done == self.total:
            self.last = time.time()
            log.info("%s: %d/%d shards, %s", self.label, self.done, self.total, rates)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sharded(
    rows: list[Row],
    out_dir: Path,
    shard_size: int,
    factory: WorkerFactory,
    *,
    backend: str = "ray",
    replicas: int = 1,
    resources: Resources = CPU_ONLY,
    ray_address: str = "",
    ray_num_cpus: int = 0,
    log_every_s: float = 30.0,
    label: str = "",
    should_stop: Callable[[], bool] | None = None,
    part_rows: int = 0,
    warm: WarmEngines | None = None,
) -> RunStats:
    """Process `rows` in shards under `out_dir/shards`, skipping shards already finished;
    `part_rows` > 0 keeps the finished parts of interrupted shards (module docstring);
    with `warm`, replicas of the same identity are taken from it and handed back to it
    (`cpt.warm`) instead of being started and closed here.

    Returns the stats of all shards (finished before and now). Raises StoreError if
    `should_stop()` became true before every shard was finished (e.g. preemption): the
    finished shards are kept, and a re-run continues from them.
    """
    started = time.time()
    shards = plan_shards([r["id"] for r in rows], shard_size)
    done = store.finished_shards(out_dir, len(shards))
    todo = [i for i in range(len(shards)) if i not in done]
    log.info(
        "%s: %d rows in %d shards, %d finished before, %d to do",
        label,
        len(rows),
        len(shards),
        len(done),
        len(todo),
    )
    retried = 0
    if todo:
        progress = _Progress(len(shards), len(done), log_every_s, label or out_dir.name)
        payload = {i: [rows[j] for j in shards[i]] for i in todo}
        try:
            if backend == "inline":
                _run_inline(payload, out_dir, part_rows, factory, done, progress, should_stop, warm)
            else:
                retried = _run_ray(
                    payload,
                    out_dir,
                    part_rows,
                    factory,
                    replicas,
                    resources,
                    ray_address,
                    ray_num_cpus,
                    done,
                    progress,
                    should_stop,
                    warm,
                )
        finally:
            progress.close()
    missing = [i for i in range(len(shards)) if i not in done]
    if missing:
        raise store.StoreError(
            f"{out_dir}: stopped with {len(missing)} of {len(shards)} shards "
            "unfinished; re-run to continue from the finished ones"
        )
    receipts = list(done.values())
    reused = sum(r.get("rows_reused", 0) for i, r in done.items() if i in todo)
    if reused:
        log.info("%s: %d rows of interrupted shards kept, not recomputed", label, reused)
    return RunStats(
        n_shards=len(shards),
        shards_skipped=len(shards) - len(todo),
        rows=sum(r["rows"] for r in receipts),
        seconds=round(time.time() - started, 3),
        tokens=sum(r.get("tokens", 0) for r in receipts),
        failures=sum(r.get("failures", 0) for r in receipts),
        retried_shards=retried,
        rows_reused=reused,
        prompt_tokens=sum(r.get("prompt_tokens", 0) for r in receipts),
        shard_seconds=round(sum(r.get("seconds", 0.0) for r in receipts), 3),
        cached_tokens=sum(r.get("cached_tokens", 0) for r in receipts),
    )


def _run_inline(
    payload: dict[int, list[Row]],
    out_dir: Path,
    part_rows: int,
    factory: WorkerFactory,
    done: dict[int, dict],
    progress: _Progress,
    should_stop: Callable[[], bool] | None,
    warm: WarmEngines | None,
) -> None:
    """The shards one after another in this process, by one worker (warm, or built here)."""
    key = warm.key(factory) if warm is not None else None
    entry = warm.acquire(key) if warm is not None else None
    held = entry.pool if entry else Held(factory)
    if entry:
        held.bind(factory)
    finished = False
    try:
        for i in payload:
            if should_stop and should_stop():
                break
            receipt = process_shard(held.worker, out_dir, i, payload[i], part_rows, should_stop)
            if receipt is None:  # stopped between two parts
                break
            done[i] = receipt
            progress.update(receipt)
        finished = True
    finally:
        if finished and warm is not None and key:
            warm.release(warm.record(factory, key, entry, held.load_seconds, 1), held)
        else:  # the next stage may need the GPU memory this engine holds
            held.close()


def _make_actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ShardActor:
        def __init__(self, factory: WorkerFactory):
            self.held = Held(factory)

        def bind(self, factory: WorkerFactory) -> None:
            self.held.bind(factory)

        def load_seconds(self) -> float:
            return self.held.load_seconds

        def run(self, out_dir: str, index: int, rows: list[Row], part_rows: int) -> dict | None:
            return process_shard(self.held.worker, Path(out_dir), index, rows, part_rows)

        def close(self) -> None:
            self.held.close()

    return ShardActor


def _load_seconds(refs: list[Any]) -> float:
    """The longest model load of the replicas started side by side (one that died since is
    left out)."""
    import ray

    seconds = []
    for ref in refs:
        with contextlib.suppress(Exception):
            seconds.append(ray.get(ref, timeout=WAIT_S))
    return max(seconds, default=0.0)


def _run_ray(
    payload: dict[int, list[Row]],
    out_dir: Path,
    part_rows: int,
    factory: WorkerFactory,
    replicas: int,
    resources: Resources,
    address: str,
    num_cpus: int,
    done: dict[int, dict],
    progress: _Progress,
    should_stop: Callable[[], bool] | None,
    warm: WarmEngines | None,
) -> int:
    """Actor pool pulling shards from a queue; a shard whose actor died goes back in."""
    import ray
    from ray.exceptions import RayActorError

    init_ray(address, num_cpus)
    label = progress.label
    key = warm.key(factory, resources, address) if warm is not None else None
    entry = warm.acquire(key) if warm is not None else None
    if entry:  # warm replicas: the same engine, this stage's worker around it
        try:
            ray.get([a.bind.remote(factory) for a in entry.pool.actors])
        except Exception as exc:  # one died while idle: start afresh
            log.warning("%s: warm replicas lost (%s); starting new ones", label, exc)
            entry.pool.close(graceful=False)
            entry = None
    if entry:
        pool = entry.pool
        pool.factory, pool.label = factory, label  # (for replacements)
    else:
        pool = ReplicaPool(_make_actor_class(), factory, resources, label)
    queue = sorted(payload)
    attempts = dict.fromkeys(payload, 0)
    in_flight: dict[Any, tuple[Any, int]] = {}
    retried = 0
    finished = False

    def dispatch(actor: Any) -> None:
        if queue and not (should_stop and should_stop()):
            i = queue.pop(0)
            attempts[i] += 1
            in_flight[actor.run.remote(str(out_dir), i, payload[i], part_rows)] = (actor, i)

    watch = HeadWatch(ray.get_runtime_context().gcs_address, str(out_dir), done)
    try:
        held = len(pool.actors)
        n = replica_count(replicas, resources, len(payload), address, held)
        log.info(
            "%s: %d replica(s), %s GPU and %s CPU each%s",
            label,
            n,
            resources.gpus,
            resources.cpus,
            f" ({held} warm from stage {entry.loaded_in})" if entry else "",
        )
        loads = [a.load_seconds.remote() for a in pool.start(max(0, n - held))]
        for actor in pool.actors:
            dispatch(actor)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            if watch.lost.is_set():
                watch.noticed.set()
                raise RaySessionLost(watch.message())
            if not ready:
                continue
            actor, i = in_flight.pop(ready[0])
            try:
                done[i] = ray.get(ready[0])
                progress.update(done[i])
                dispatch(actor)
            except RayActorError as exc:
                if exc.actor_init_failed:  # e.g. a bad model path: retrying cannot help
                    raise store.StoreError(
                        f"{out_dir}: a worker replica failed to start: {exc}"
                    ) from None
                log.warning(
                    "shard %d: worker replica died (%s); retrying on another",
                    i,
                    str(exc).splitlines()[0],
                )
                if attempts[i] >= MAX_SHARD_ATTEMPTS:
                    raise store.StoreError(
                        f"{out_dir}: shard {i} failed {attempts[i]} times "
                        "(worker replica died each time)"
                    ) from exc
                retried += 1
                queue.insert(0, i)
                dispatch(pool.replace(actor))
        finished = True
    finally:
        watch.stop.set()
        if watch.lost.is_set():  # nobody to talk to: leave without Ray's own time-out
            with contextlib.suppress(Exception):
                ray.shutdown()
        elif finished and warm is not None and key:  # kept for the next stage that uses them
            load_s = _load_seconds(loads)
            warm.release(warm.record(factory, key, entry, load_s, len(pool.actors)), pool)
        else:  # actors and their placement groups go: the next stage finds the GPUs free
            pool.close(graceful=finished)
    return retried


class HeadWatch(threading.Thread):
    """Watches the Ray head (GCS) while shards run. Ray ends a driver whose head is gone
    after 60 s without a word, so once the head has not answered for `HEAD_LOST_S`, the
    driver's loop raises `RaySessionLost`; if the loop is stuck inside Ray (e.g. creating a
    replacement actor), this thread prints the same one line and ends the process (exit 1).
    Finished shards and part-files are on disk either way."""

    def __init__(self, gcs: str, out_dir: str, done: dict[int, dict]) -> None:
        super().__init__(name="cpt-ray-head-watch", daemon=True)
        self.gcs, self.out_dir, self.done = gcs, out_dir, done
        self.lost, self.noticed, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.start()

    def message(self) -> str:
        return (
            f"{self.out_dir}: the Ray session at {self.gcs} died (its head has not answered "
            f"for {HEAD_LOST_S:.0f} s); {len(self.done)} finished shards are kept, re-run to "
            "continue"
        )

    def run(self) -> None:
        silent_since = None
        while not self.stop.wait(WAIT_S / 5):
            if _answers(self.gcs):
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= HEAD_LOST_S:
                self.lost.set()
                if not (self.noticed.wait(2 * WAIT_S) or self.stop.is_set()):
                    print(f"cpt: error: {self.message()}", file=sys.stderr, flush=True)
                    os._exit(1)
                return


def _answers(address: str) -> bool:
    """Whether the Ray head (GCS) at `host:port` accepts a connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def n_shards(n_rows: int, shard_size: int) -> int:
    return math.ceil(n_rows / shard_size) if n_rows else 0
