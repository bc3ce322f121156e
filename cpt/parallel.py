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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cpt import store

log = logging.getLogger(__name__)

Row = dict[str, Any]
Worker = Callable[[list[Row]], list[Row]]
WorkerFactory = Callable[[], Worker]

MAX_SHARD_ATTEMPTS = 3  # a shard whose worker died is retried on another replica
WAIT_S = 5.0  # how often the driver checks that the Ray head still answers
HEAD_LOST_S = 20.0  # then it stops, before Ray's own 60 s limit ends it without a word


class RaySessionLost(store.StoreError):
    """The Ray cluster (its head) went away under a running stage."""


@dataclass(frozen=True)
class Resources:
    """What one worker replica reserves in Ray."""

    cpus: float = 1.0
    gpus: int = 0  # GPUs per replica (tensor parallel size for vLLM)


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
        "failures": sum(1 for r in rows if r.get("ok") is False),
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
    resources: Resources = Resources(),
    ray_address: str = "",
    ray_num_cpus: int = 0,
    log_every_s: float = 30.0,
    label: str = "",
    should_stop: Callable[[], bool] | None = None,
    part_rows: int = 0,
) -> RunStats:
    """Process `rows` in shards under `out_dir/shards`, skipping shards already finished;
    `part_rows` > 0 keeps the finished parts of interrupted shards (module docstring).

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
                worker = factory()
                try:
                    for i in todo:
                        if should_stop and should_stop():
                            break
                        receipt = process_shard(
                            worker, out_dir, i, payload[i], part_rows, should_stop
                        )
                        if receipt is None:  # stopped between two parts
                            break
                        done[i] = receipt
                        progress.update(receipt)
                finally:  # the next stage may need the GPU memory this engine holds
                    close_worker(worker)
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
    )


def init_ray(address: str = "", num_cpus: int = 0) -> None:
    """Join `address` (a cluster) or start a local Ray; no dashboard, quiet.

    One Ray session per process, reused by every stage: a later call is a no-op (stages
    never shut Ray down; the process's exit does).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "ignore_reinit_error": True,
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        kwargs["num_gpus"] = machine_gpus()
    ray.init(**kwargs)


def machine_gpus() -> int:
    """GPUs this process may use: `CUDA_VISIBLE_DEVICES` if set, else what `nvidia-smi -L` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def gpu_capacity(address: str = "") -> tuple[int, str]:
    """GPUs the workers can get, and where they were counted (for error messages).

    With `address` (a Ray cluster, whose GPUs may be fake ones: `ray start --num-gpus=2`) the
    cluster's GPUs; otherwise this machine's.
    """
    if not address:
        return machine_gpus(), "this machine"
    import ray

    init_ray(address)
    return int(ray.cluster_resources().get("GPU", 0)), f"the Ray cluster at {address}"


def check_gpus(requests: dict[str, int], address: str = "") -> list[str]:
    """One problem per model asking for more GPUs per replica than there are at all, e.g.
    `teacher.gpus=1 but this machine has 0 GPUs`; Ray would otherwise wait forever."""
    wanted = {key: n for key, n in requests.items() if n > 0}
    if not wanted:
        return []
    have, where = gpu_capacity(address)
    return [
        f"{key}={n} but {where} has {have} GPUs (set {key}=0 to run on CPU, or point "
        "parallel.address at a cluster with GPUs)"
        for key, n in wanted.items()
        if n > have
    ]


def _make_actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class ShardActor:
        def __init__(self, factory: WorkerFactory):
            self.worker = factory()

        def run(self, out_dir: str, index: int, rows: list[Row], part_rows: int) -> dict | None:
            return process_shard(self.worker, Path(out_dir), index, rows, part_rows)

        def close(self) -> None:
            close_worker(self.worker)

    return ShardActor


def close_worker(worker: Worker) -> None:
    """Free what a worker holds (its engine's model, GPU memory) if it can say so."""
    close = getattr(worker, "close", None)
    if callable(close):
        close()


PG_READY_TIMEOUT_S = 600.0  # a replica's GPUs not free by then: fail, naming what waited
CLOSE_TIMEOUT_S = 60.0  # graceful engine shutdown at the end of a stage, then kill


class ReplicaPool:
    """Worker replicas (Ray actors), each with its own placement group when it needs GPUs.

    A replica's group lives exactly as long as the replica: `replace` removes a dead
    replica's group before scheduling the replacement (so the replacement can take its
    GPUs), and `close` (normal end, error or Ctrl-C) kills every actor and removes every
    group, so the next stage in this process finds the GPUs free.
    """

    def __init__(self, factory: WorkerFactory, resources: Resources, label: str) -> None:
        self.factory, self.resources, self.label = factory, resources, label
        self.actor_cls = _make_actor_class()
        self.groups: dict[Any, Any] = {}  # actor -> its placement group (or None)

    @property
    def actors(self) -> list[Any]:
        return list(self.groups)

    def start(self, n: int) -> list[Any]:
        groups = [self._placement_group() for _ in range(n)]
        self._wait_ready([g for g in groups if g is not None])
        actors = [self._actor(g) for g in groups]
        self.groups.update(zip(actors, groups))
        return actors

    def replace(self, dead: Any) -> Any:
        """Kill `dead`, give its GPUs back, then start a replacement on a fresh group."""
        self._release(dead)
        return self.start(1)[0]

    def close(self, graceful: bool) -> None:
        """End every replica; `graceful` first lets each close its engine (vLLM shutdown)."""
        import ray

        if graceful and self.groups:
            refs = [a.close.remote() for a in self.groups]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)
            except Exception as exc:  # a replica that cannot close is killed below anyway
                log.debug("%s: closing replicas: %s", self.label, exc)
        for actor in list(self.groups):
            self._release(actor)

    def _release(self, actor: Any) -> None:
        import ray
        from ray.util import remove_placement_group

        group = self.groups.pop(actor, None)
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        if group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(group)

    def _placement_group(self) -> Any:
        """All of one replica's GPUs (tensor parallel) in one group on one node."""
        r = self.resources
        if r.gpus <= 0:
            return None
        from ray.util.placement_group import placement_group

        bundles = [{"GPU": 1, "CPU": r.cpus}] + [{"GPU": 1}] * (r.gpus - 1)
        return placement_group(bundles, strategy="STRICT_PACK")

    def _wait_ready(self, groups: list[Any]) -> None:
        import ray

        if not groups:
            return
        _, pending = ray.wait(
            [g.ready() for g in groups], num_returns=len(groups), timeout=PG_READY_TIMEOUT_S
        )
        if pending:
            from ray.util import remove_placement_group

            for g in groups:
                with contextlib.suppress(Exception):
                    remove_placement_group(g)
            raise store.StoreError(
                f"{self.label}: {len(pending)} of {len(groups)} replicas did not get their "
                f"{self.resources.gpus} GPU(s) within {PG_READY_TIMEOUT_S:.0f} s (held by "
                "another job?); free them or lower engine.replicas"
            )

    def _actor(self, group: Any) -> Any:
        r = self.resources
        options: dict[str, Any] = {"num_cpus": r.cpus}
        if group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options.update(
                num_gpus=1 if r.gpus == 1 else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group,
                    placement_group_bundle_index=0,
                    placement_group_capture_child_tasks=True,
                ),
            )
        return self.actor_cls.options(**options).remote(self.factory)


def replica_count(requested: int, resources: Resources, n_shards: int, address: str) -> int:
    """Replicas to start: `requested`, or with 0 as many as the free GPUs (CPUs) allow,
    ⌊free / per replica⌋; never more than fit the cluster at all, nor than shards to do.

    Raises StoreError when one replica needs more GPUs than the whole cluster has (Ray
    would wait for them forever).
    """
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    if resources.gpus > 0:
        have = int(total.get("GPU", 0))
        if resources.gpus > have:
            where = f"the Ray cluster at {address}" if address else "this machine"
            raise store.StoreError(
                f"a replica needs {resources.gpus} GPUs but {where} has {have} GPUs "
                "(set the model's gpus=0 to run on CPU)"
            )
        fit, room = have // resources.gpus, int(free.get("GPU", 0)) // resources.gpus
    else:
        fit = int(total.get("CPU", 1) // resources.cpus)
        room = int(free.get("CPU", 1) // resources.cpus)
    n = requested if requested > 0 else room
    return max(1, min(n, fit, n_shards))


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
) -> int:
    """Actor pool pulling shards from a queue; a shard whose actor died goes back in."""
    import ray
    from ray.exceptions import RayActorError

    init_ray(address, num_cpus)
    label = progress.label
    pool = ReplicaPool(factory, resources, label)
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
        n = replica_count(replicas, resources, len(payload), address)
        log.info(
            "%s: %d replica(s), %s GPU and %s CPU each", label, n, resources.gpus, resources.cpus
        )
        for actor in pool.start(n):
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
