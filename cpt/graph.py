"""The stage graph as data: what a stage is (`StageSpec`), what it gets (`StageContext`),
and the plan of one launch (`RunPlan`), resolved once by `resolve`.

Each stage is a pure function of (its parameters, its inputs) -> an output folder keyed
by a hash of both. So a sweep over students reuses one data generation, a finished stage
is skipped, and two configs that differ only in a student share every data stage.

`resolve` computes every node's key, folder, done-state and job resources exactly once
per launch; the local runner (`cpt.pipeline`), the Slurm submitter (`cpt.slurm`),
`plan=true` and `stage=status` all read that one plan. This module sits at the bottom:
it imports only `cpt.store` (the config and the warm engines are types here, never imported
at run time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt import store

if TYPE_CHECKING:
    from cpt.config import CptConfig
    from cpt.warm import WarmEngines

TRAIN = "train"  # in `StageSpec.runs`: DPO training of the student (torch.distributed ranks)


@dataclass
class StageContext:
    """What a stage's `run` gets: the config, its output folder and its input folders, and
    the run's warm engines (`cpt.warm`; None: every engine is loaded and closed in the stage)."""

    cfg: CptConfig
    name: str
    key: str
    out_dir: Path
    inputs: dict[str, Path] = field(default_factory=dict)
    warm: WarmEngines | None = None


@dataclass(frozen=True)
class StageSpec:
    """A node of the graph.

    params: the values (besides the inputs' keys) that determine the output; hashed.
    run: does the work, writes shards under ctx.out_dir, returns stats for the manifest.
    plan: the work a run would do, for `plan=true` (e.g. {"rows<=": 42, "shards<=": 2}).
    per_student: the output depends on the student (one folder per student, labelled).
    runs: what the stage runs that may need GPUs: model roles served by engines
        ("teacher", "judge", "student") and/or TRAIN; its job is sized from them.
    version: bump when the stage's logic changes, so old outputs are not reused.
    always_run: a cheap view of other stages (report): one folder, re-rendered every run.
    skip: inputs of `needs` a config does without (an external model needs no train).
    estimate: the stage's model work counted from the config alone (`cpt.workload.Phase`
        list; none for a stage that runs no model), for the planner.
    """

    name: str
    needs: tuple[str, ...]
    params: Callable[[CptConfig], Any]
    run: Callable[[StageContext], dict[str, Any]]
    plan: Callable[[CptConfig], dict[str, Any]] = lambda cfg: {}
    per_student: bool = False
    runs: tuple[str, ...] = ()
    version: int = 1
    always_run: bool = False
    skip: Callable[[CptConfig], tuple[str, ...]] = lambda cfg: ()
    estimate: Callable[[CptConfig], list[Any]] = lambda cfg: []

    def inputs(self, cfg: CptConfig) -> tuple[str, ...]:
        """`needs` less what this config does without (e.g. no train for an external model)."""
        skipped = set(self.skip(cfg))
        return tuple(d for d in self.needs if d not in skipped)

    @property
    def gpu(self) -> bool:
        """Whether the stage may need GPUs (it runs a model or trains)."""
        return bool(self.runs)


@dataclass(frozen=True)
class JobResources:
    """What one stage job asks Slurm for: `tasks_per_node` processes on each of `nodes`
    nodes, with `gpus_per_node` GPUs and `cpus_per_task` CPUs per task. `ranks`: the tasks
    are torch.distributed ranks (training, launched by srun); otherwise a job over several
    nodes is one process that starts Ray across them."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    time_min: int
    partition: str | None
    tasks_per_node: int = 1
    ranks: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node if self.ranks else 1

    @property
    def gpu_hours(self) -> float:
        """Upper bound: every GPU held for the whole time limit."""
        return self.nodes * self.gpus_per_node * self.time_min / 60

    def describe(self) -> str:
        nodes = f"{self.nodes} nodes, " if self.nodes > 1 else ""
        tasks = f"{self.tasks_per_node} tasks, " if self.tasks_per_node > 1 else ""
        return (
            f"{nodes}{tasks}{self.gpus_per_node} GPU, {self.cpus_per_task} CPU, "
            f"{self.mem_gb} GB, {self.time_min} min"
        )


@dataclass(frozen=True)
class Size:
    """The GPUs of one stage job: `nodes` x `gpus_per_node`, `tasks_per_node` each."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1


def replica_gpus(cfg: CptConfig, role: str) -> int:
    """GPUs one replica of the `role` model needs here (a model behind an OpenAI-compatible
    server runs elsewhere: none)."""
    model = getattr(cfg, role)
    kind = model.engine or cfg.engine.kind
    return 0 if getattr(kind, "value", kind) == "openai" else model.gpus


def _shard_bound(work: Mapping[str, Any]) -> int | None:
    """The shards a stage will have, from its plan (`shards` or `shards<=`), if it says."""
    for key in ("shards", "shards<="):
        if isinstance(work.get(key), int):
            return max(1, work[key])
    return None


def stage_size(
    cfg: CptConfig, runs: tuple[str, ...], work: Mapping[str, Any], multi_node: bool
) -> Size:
    """GPUs of a stage job that runs `runs` and has the plan info `work`.

    Models: `replicas x model.gpus` (replicas from `engine.replicas`, or with 0 as many
    as the profile's GPUs allow; never more than the stage has shards), the largest over
    the stage's models (they run one after another), within the profile. Training:
    `train.gpus` per node (one rank each; on a profile without GPUs the ranks use CPUs)
    on `train.nodes` nodes.
    """
    c = cfg.cluster
    if TRAIN in runs:
        ranks = max(1, cfg.train.gpus)
        return Size(cfg.train.nodes, min(cfg.train.gpus, c.gpus_per_node), ranks)
    capacity = c.gpus_per_node * (c.nodes if multi_node else 1)
    shards = _shard_bound(work)
    need = 0
    for role in runs:
        per = replica_gpus(cfg, role)
        if per <= 0 or per > capacity:
            continue  # (a model larger than a node is refused at launch: `profile_problems`)
        replicas = cfg.engine.replicas or capacity // per
        if shards is not None:
            replicas = min(replicas, shards)
        need = max(need, min(replicas, capacity // per) * per)
    if need <= c.gpus_per_node:
        return Size(1, need, 1)
    return Size(math.ceil(need / c.gpus_per_node), c.gpus_per_node, 1)


def profile_problems(cfg: CptConfig, roles: set[str]) -> list[str]:
    """Models the cluster profile cannot hold: one replica stays on one node."""
    c = cfg.cluster
    return [
        f"{role}.gpus={replica_gpus(cfg, role)} but cluster {c.name} has {c.gpus_per_node} "
        f"GPUs per node (cluster.gpus_per_node); lower {role}.gpus or pick another cluster"
        for role in sorted(roles)
        if replica_gpus(cfg, role) > c.gpus_per_node
    ]


def stage_resources(cfg: CptConfig, spec: StageSpec) -> JobResources:
    """A stage job sized from what the stage runs (`stage_size`); CPU stages get no GPU.
    Time: the stage's `cluster.stage_time_min` entry, else the profile's `time_min`."""
    c = cfg.cluster
    multi = c.nodes > 1 and TRAIN not in spec.runs and cfg.parallel.backend == "ray"
    size = stage_size(cfg, spec.runs, spec.plan(cfg), multi) if spec.runs else Size()
    time_min = int(c.stage_time_min.get(spec.name, c.time_min))
    if size.gpus_per_node or size.tasks_per_node > 1 or size.nodes > 1:
        per_task = size.gpus_per_node // size.tasks_per_node
        return JobResources(
            nodes=size.nodes,
            gpus_per_node=size.gpus_per_node,
            cpus_per_task=c.cpus_per_task * max(1, per_task),
            mem_gb=c.mem_gb,
            time_min=time_min,
            partition=c.partition if size.gpus_per_node else c.cpu_partition or c.partition,
            tasks_per_node=size.tasks_per_node,
            ranks=TRAIN in spec.runs,
        )
    return JobResources(
        nodes=1,
        gpus_per_node=0,
        cpus_per_task=c.cpus_per_task,
        mem_gb=c.cpu_mem_gb or c.mem_gb,
        time_min=time_min,
        partition=c.cpu_partition or c.partition,
    )


@dataclass(frozen=True)
class Node:
    """One stage of one launch, resolved: its key, folder, inputs, resources, done-state.

    `done` is read once, when the plan is resolved; runners re-check only under the
    stage's lock (another launch may have finished it meanwhile).
    """

    name: str
    spec: StageSpec
    key: str
    folder: Path
    needs: tuple[str, ...]
    resources: JobResources
    done: bool

    @property
    def always_run(self) -> bool:
        return self.spec.always_run


@dataclass(frozen=True)
class RunPlan:
    """Every stage of the pipeline for one config, in pipeline order, and the selection."""

    cfg: CptConfig
    run_dir: Path
    nodes: dict[str, Node]
    selected: tuple[str, ...]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def selected_nodes(self) -> list[Node]:
        return [self.nodes[n] for n in self.selected]


def stage_key(
    spec: StageSpec,
    params: Any,
    input_keys: Mapping[str, str],
    needs: tuple[str, ...] | None = None,
) -> str:
    """The content hash naming a stage's output folder: its version, params, inputs' keys."""
    return store.content_hash(
        {
            "stage": spec.name,
            "version": spec.version,
            "params": params,
            "inputs": {dep: input_keys[dep] for dep in (spec.needs if needs is None else needs)},
        }
    )


def _select(cfg: CptConfig, nodes: dict[str, Node]) -> tuple[str, ...]:
    """The stage named by `stage=`, with its unfinished inputs; by default the last stage
    (the report) and everything it needs (every stage, unless a config skips some)."""
    name = getattr(cfg.stage, "value", cfg.stage)
    if name is None or name not in nodes:
        last = list(nodes)[-1]
        wanted, frontier = {last}, [last]
        while frontier:
            for dep in nodes[frontier.pop()].needs:
                if dep not in wanted:
                    wanted.add(dep)
                    frontier.append(dep)
        return tuple(s for s in nodes if s in wanted)
    if nodes[name].always_run:
        return (name,)
    wanted, frontier = {name}, [name]
    while frontier:
        for dep in nodes[frontier.pop()].needs:
            if dep not in wanted and not nodes[dep].done:
                wanted.add(dep)
                frontier.append(dep)
    return tuple(s for s in nodes if s in wanted)


def resolve(cfg: CptConfig, specs: Mapping[str, StageSpec]) -> RunPlan:
    """The plan of one launch: each node's key, folder and done-state computed once.

    `specs` lists every stage in pipeline order (inputs before their users).
    """
    run_dir = Path(cfg.run_dir).absolute()
    root = store.Store(run_dir)
    nodes: dict[str, Node] = {}
    for name, spec in specs.items():
        missing = [d for d in spec.needs if d not in nodes]
        if missing:
            raise ValueError(f"stage {name}: inputs {missing} must come before it in the registry")
        needs = spec.inputs(cfg)
        key = stage_key(spec, spec.params(cfg), {d: nodes[d].key for d in needs}, needs)
        if spec.always_run:
            folder = run_dir / name
        else:
            label = cfg.student.name if spec.per_student else ""
            folder = root.stage_dir(name, key, label)
        nodes[name] = Node(
            name=name,
            spec=spec,
            key=key,
            folder=folder,
            needs=needs,
            resources=stage_resources(cfg, spec),
            done=store.is_done(folder),
        )
    return RunPlan(cfg=cfg, run_dir=run_dir, nodes=nodes, selected=_select(cfg, nodes))


def format_work(info: Mapping[str, Any]) -> str:
    """A stage's `StageSpec.plan` as text: `rows<=42, shards<=2, filter=False`."""
    return ", ".join(
        f"{k}{v}" if str(k).endswith(("<=", ">=")) else f"{k}={v}" for k, v in info.items()
    )
