"""Warm engines: a loaded engine is kept for the next stage of this process that uses it.

Starting a replica (a Ray actor's process, its imports, the weights, vLLM's engine start)
costs tens of seconds, and consecutive stages of one local run often use the same model
with the same engine settings: the teacher in generate then sysprompts, the judge in
adherence then evaluate, and in the default config one model plays all three roles. The
runner (`cpt.pipeline`) owns one `WarmEngines` per launch and hands it to every stage
(`StageContext.warm`); the sharded runner (`cpt.parallel`) takes the warm replicas whose
identity it needs instead of starting new ones, and hands its replicas back when its stage
is done with them.

Identity: a worker factory that can be reused says what its expensive part is built from
(`Reusable.warm_identity`: model path, revision, dtype, context length, GPUs, tensor
parallel, every engine setting; never the sampling, which each request carries); the key
adds the replicas' Ray resources and cluster address.

Memory: one identity is warm at a time. Taking one that is not warm closes the others first,
so the new engine gets their (GPU) memory, as when every stage closed its own; the runner
closes every warm engine before a stage that trains, at the end of a run and on an error.
Under Slurm each stage is its own job and process: there warmth lasts within one stage
(evaluate: the student, then the judge of the same model), not across stages.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cpt import store

log = logging.getLogger(__name__)

Worker = Any  # a callable rows -> output rows (`cpt.parallel.Worker`)


@runtime_checkable
class Reusable(Protocol):
    """A worker factory whose expensive part (`load`: an engine) can serve the worker of a
    later factory with the same `warm_identity` (`bind`: cheap)."""

    def warm_identity(self) -> dict[str, Any]:
        """Everything the loaded part is built from, JSON-able; `model` and `engine` name it."""
        ...

    def load(self) -> Any: ...

    def bind(self, loaded: Any) -> Worker: ...


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if callable(close):
        close()


class Held:
    """A worker built by a factory, with its loaded part kept apart when the factory is
    `Reusable`, so that a later factory of the same identity binds a new worker to it
    (inside a replica actor, or in this process for the inline backend)."""

    def __init__(self, factory: Any) -> None:
        started = time.perf_counter()
        self.loaded: Any = None
        if isinstance(factory, Reusable):
            self.loaded = factory.load()
            self.worker = factory.bind(self.loaded)
        else:
            self.worker = factory()
        self.load_seconds = round(time.perf_counter() - started, 3)

    def bind(self, factory: Reusable) -> None:
        self.worker = factory.bind(self.loaded)

    def close(self, graceful: bool = True) -> None:
        """Free what the worker holds (its engine's model, GPU memory)."""
        _close(self.loaded if self.loaded is not None else self.worker)


@dataclass
class Entry:
    """Replicas of one identity: a `cpt.replicas.ReplicaPool` or an inline `Held`."""

    key: str
    pool: Any
    model: str
    engine: str
    loaded_in: str  # the stage whose run started them
    load_seconds: float


@dataclass
class WarmEngines:
    """The warm replicas of one process, by identity, and what each stage loaded or reused.

    `enabled=False` (`parallel.warm=false`) keeps nothing: every stage loads its own, and
    the manifests still say what was loaded and how long it took.
    """

    enabled: bool = True
    stage: str = ""
    entries: dict[str, Entry] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def key(factory: Any, *context: Any) -> str | None:
        """The identity key of `factory`'s replicas (None: not reusable)."""
        if not isinstance(factory, Reusable):
            return None
        return store.content_hash([factory.warm_identity(), *context])

    def begin(self, stage: str) -> None:
        """A new stage starts: what it loads or reuses is recorded under its name."""
        self.stage, self.events = stage, []

    def acquire(self, key: str | None) -> Entry | None:
        """The warm replicas of `key`, taken out (None: none warm, or `key` None: a worker
        that is not reusable); every other warm identity is closed first, so what the caller
        loads gets their memory."""
        for other in [k for k in self.entries if k != key]:
            self._close(self.entries.pop(other), "another engine is needed")
        return self.entries.pop(key, None)

    def record(self, factory: Any, key: str, reused: Entry | None, load_s: float, n: int) -> Entry:
        """Note what a run used (`reused`, or replicas it loaded in `load_s` seconds)."""
        ident = factory.warm_identity()
        entry = reused or Entry(
            key, None, str(ident["model"]), str(ident["engine"]), self.stage, load_s
        )
        self.events.append(
            {
                "model": entry.model,
                "engine": entry.engine,
                "key": key,
                "reused_from": reused.loaded_in if reused else None,
                "load_seconds": 0.0 if reused else round(load_s, 3),
                "replicas": n,
            }
        )
        return entry

    def release(self, entry: Entry, pool: Any) -> None:
        """Keep `pool` warm for a later stage (or close it when warmth is off)."""
        if not self.enabled:
            pool.close(graceful=True)
            return
        entry.pool = pool
        self.entries[entry.key] = entry

    def close_all(self, why: str) -> None:
        """Close every warm replica (before training, at the end of a run, on an error)."""
        for key in list(self.entries):
            self._close(self.entries.pop(key), why)

    def report(self) -> dict[str, Any]:
        """The current stage's manifest fields: each engine used (`reused_from`: the stage
        that loaded it, None if this stage did) and the seconds spent loading."""
        return {
            "engines": list(self.events),
            "load_seconds": round(sum(e["load_seconds"] for e in self.events), 3),
        }

    def _close(self, entry: Entry, why: str) -> None:
        log.info("closing the warm %s engine of %s (%s)", entry.engine, entry.model, why)
        with contextlib.suppress(Exception):  # a dead session: nothing left to free
            entry.pool.close(graceful=True)
