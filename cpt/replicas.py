"""Worker replicas as Ray actors, and the GPUs they hold.

One Ray session per process (`init_ray`), reused by every stage. A replica that needs GPUs
gets its own placement group, which lives exactly as long as the replica (`ReplicaPool`):
removed when the replica dies (before its replacement is scheduled) and when the pool
closes (normal end, error, Ctrl-C), so the next stage finds the GPUs free. (A stage may
hand its pool to the next one of the same model instead of closing it: `cpt.warm`.) A model asking
for more GPUs than there are is an error at once (`check_gpus`, `replica_count`), not Ray
waiting forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from cpt import store
from cpt.gpus import machine_gpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """What one worker replica reserves in Ray."""

    cpus: float = 1.0
    gpus: int = 0  # GPUs per replica (tensor parallel size for vLLM)


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
        # Ray starts workers at nice 15; in a local run the actors are the work, and at nice 15
        # they got ~1/28 of a CPU against any busy process (a real-model stage: 30 min, not 2)
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(**kwargs)


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


PG_READY_TIMEOUT_S = 600.0  # a replica's GPUs not free by then: fail, naming what waited
CLOSE_TIMEOUT_S = 60.0  # graceful engine shutdown at the end of a stage, then kill


class ReplicaPool:
    """Worker replicas (Ray actors), each with its own placement group when it needs GPUs.

    A replica's group lives exactly as long as the replica: `replace` removes a dead
    replica's group before scheduling the replacement (so the replacement can take its
    GPUs), and `close` (normal end, error or Ctrl-C) kills every actor and removes every
    group, so the next stage in this process finds the GPUs free.
    """

    def __init__(self, actor_cls: Any, factory: Any, resources: Resources, label: str) -> None:
        self.actor_cls, self.factory, self.resources, self.label = (
            actor_cls,
            factory,
            resources,
            label,
        )
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


def replica_count(
    requested: int, resources: Resources, n_shards: int, address: str, held: int = 0
) -> int:
    """Replicas to run: `requested`, or with 0 as many as the free GPUs (CPUs) allow,
    ⌊free / per replica⌋ plus the `held` ones the caller has already (warm, `cpt.warm`);
    never more than fit the cluster at all, nor than shards to do.

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
    n = requested if requested > 0 else room + held
    return max(1, min(n, fit, n_shards))
