"""The GPU-hour planner: each stage's tokens, wall time and GPU-hours before it runs,
from a throughput table learnt from the manifests of finished stages.

A stage's time is modelled as its own overhead (reading inputs, writing tables: keyed by
stage and device) plus, for each model phase (`cpt.workload.Phase`), the engine's start-up
and its work at the measured seconds per unit, keyed by (phase kind, model, engine,
device), or where that stage's phase itself was measured, by (stage:phase, model, engine,
device):

    seconds = overhead[stage] + sum over phases (load_s + units x seconds_per_unit)

A unit is what the phase's time grows with (`cpt.workload.work_units`): a bound token
(requests x `max_new_tokens`) for engines that batch continuously, a decoding step of a
batch for the hf engine, a sequence token for training. The expected completion tokens
are `fill` x the bound, `fill` being the measured share of `max_new_tokens` a model really
writes (a real model stops early; a judge's retries count too). All of it is measured: a
finished stage's manifest holds its phases (tokens, units, runner and shard seconds) and
its wall time. With no measurement for a key the planner says so and predicts nothing for
that stage (`plan=probe` runs every stage, small and real, to measure it) rather than
invent a rate.

The table (`<run_dir>/.cpt/throughput.json`, or `planner.table` for one shared across
runs) keeps the measured samples by manifest path, so re-learning never counts one twice.
Each launch writes its predictions to `<run_dir>/.cpt/predicted/<key>.json`; the stage's
manifest then holds them beside what it measured, and the report shows both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt import store
from cpt.graph import TRAIN, Node, RunPlan, replica_gpus
from cpt.workload import Phase

if TYPE_CHECKING:
    from cpt.config import CptConfig

PLANNER_DIR = ".cpt"  # under run_dir: the table, the probe run, the predictions


def device(cfg: CptConfig) -> str:
    """Where a stage's throughput was (or will be) measured: the cluster profile for Slurm
    jobs, else this machine's GPU name or `cpu`."""
    c = cfg.cluster
    if c.name != "local":
        return f"slurm:{c.name}" + (f":{c.constraint}" if c.constraint else "")
    from cpt.gpus import gpu_name

    return gpu_name() or "cpu"


def table_path(cfg: CptConfig) -> Path:
    return Path(cfg.planner.table or Path(cfg.run_dir) / PLANNER_DIR / "throughput.json")


def probe_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute() / PLANNER_DIR / "probe"


def predicted_path(run_dir: str | Path, key: str) -> Path:
    return Path(run_dir).absolute() / PLANNER_DIR / "predicted" / f"{key}.json"


@dataclass
class Rate:
    """The measurements of one (kind, model, engine, device), summed over runs."""

    tokens: int = 0
    bound: int = 0
    units: int = 0
    work_seconds: float = 0.0
    load_seconds: float = 0.0
    runs: int = 0

    def add(self, p: dict[str, Any]) -> None:
        self.tokens += p["completion_tokens"]
        self.bound += p["bound_tokens"]
        self.units += p["units"]
        self.work_seconds += p["work_seconds"]
        self.load_seconds += max(0.0, p["seconds"] - p["work_seconds"])
        self.runs += 1

    def seconds(self, units: int) -> float:
        """Start-up plus the work at the measured seconds per work unit (`work_units`)."""
        load = self.load_seconds / self.runs
        if not self.units:
            return load + (self.work_seconds / self.runs if units else 0.0)
        return load + units * self.work_seconds / self.units

    def expected_tokens(self, bound_tokens: int) -> int:
        return round(bound_tokens * self.tokens / self.bound) if self.bound else bound_tokens


def phase_key(what: str, model: str, engine: str, where: str) -> str:
    """`what` is a phase kind (`judge`) or a stage's phase (`evaluate:judge`)."""
    return f"{what} | {model} | {engine} | {where}"


@dataclass
class Table:
    """Measured samples by manifest path: {stage, device, seconds, phases}."""

    samples: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rates(self) -> dict[str, Rate]:
        """Each (kind, model, engine, device), and each (stage, phase label, model, engine,
        device) (`phase_key`): a stage's own measurement when it has one (a student with
        an adapter, or a judge reading longer prompts, runs at its own rate)."""
        out: dict[str, Rate] = {}
        for s in self.samples.values():
            for p in s["phases"]:
                if p["requests"]:
                    for what in (p["kind"], f"{s['stage']}:{p['label']}"):
                        key = phase_key(what, p["model"], p["engine"], s["device"])
                        out.setdefault(key, Rate()).add(p)
        return out

    def overheads(self) -> dict[tuple[str, str], float]:
        """Mean wall time of each (stage, device) outside its model phases."""
        sums: dict[tuple[str, str], list[float]] = {}
        for s in self.samples.values():
            rest = s["seconds"] - sum(p["seconds"] for p in s["phases"])
            sums.setdefault((s["stage"], s["device"]), []).append(max(0.0, rest))
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def as_json(self) -> dict[str, Any]:
        rates = {k: dataclasses.asdict(r) for k, r in sorted(self.rates().items())}
        return {"samples": self.samples, "rates": rates}


def _sample(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What a finished stage's manifest says about throughput (None: it predates `phases`)."""
    if "device" not in manifest or "seconds" not in manifest:
        return None
    phases = manifest.get("phases", [])
    return {
        "stage": manifest["stage"],
        "device": manifest["device"],
        "seconds": manifest["seconds"],
        "phases": phases,
    }


def scan(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Samples of every finished stage under a run folder and its probe."""
    found = {}
    for root in (run_dir, probe_dir(run_dir)):
        for path in (*root.glob("*/manifest.json"), *root.glob("*/*/manifest.json")):
            if not (path.parent / store.DONE_MARKER).exists():
                continue
            try:
                sample = _sample(store.read_json(path))
            except (store.StoreError, KeyError, TypeError):
                continue  # not a stage manifest
            if sample is not None:
                found[str(path)] = sample
    return found


def learn(cfg: CptConfig) -> Table:
    """The table: its file's samples plus those of run_dir, its probe and
    `planner.learn_from`; written back (atomically) when it grew."""
    path = table_path(cfg)
    known = store.read_json(path).get("samples", {}) if path.exists() else {}
    samples = dict(known)
    for d in (cfg.run_dir, *cfg.planner.learn_from):
        samples.update(scan(Path(d).absolute()))
    table = Table(samples)
    if samples != known:
        store.atomic_write_json(path, table.as_json())
    return table


@dataclass
class Prediction:
    """One stage, planned: its phases (estimated), expected tokens, wall time, GPUs."""

    stage: str
    phases: list[Phase]
    prompt_tokens: int
    completion_tokens: int
    seconds: float | None
    gpus: int
    missing: list[str]

    @property
    def gpu_hours(self) -> float | None:
        return None if self.seconds is None else self.gpus * self.seconds / 3600

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": None if self.seconds is None else round(self.seconds, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "gpus": self.gpus,
            "gpu_hours": self.gpu_hours,
            "missing": self.missing,
            "phases": [p.as_dict() for p in self.phases],
        }


def stage_gpus(cfg: CptConfig, node: Node) -> int:
    """GPUs the stage holds while it runs: its Slurm job's, or locally its models'."""
    if cfg.cluster.name != "local":
        return node.resources.nodes * node.resources.gpus_per_node
    if TRAIN in node.spec.runs:
        return cfg.student.gpus
    per = [replica_gpus(cfg, r) * max(1, cfg.engine.replicas) for r in node.spec.runs]
    return max(per, default=0)


def predict(cfg: CptConfig, node: Node, table: Table) -> Prediction:
    """The stage's predicted tokens and wall time (None, with what is missing, when the
    table has no measurement for one of its keys)."""
    where = device(cfg)
    try:
        phases = node.spec.estimate(cfg)
    except Exception as exc:  # e.g. a task source not reachable from here
        msg = f"cannot count the work of {node.name}: {str(exc).splitlines()[0]}"
        return Prediction(node.name, [], 0, 0, None, stage_gpus(cfg, node), [msg])
    rates = table.rates()
    overhead = table.overheads().get((node.name, where))
    missing = [] if overhead is not None else [f"({node.name} stage, {where})"]
    seconds = overhead or 0.0
    tokens = 0
    for p in phases:
        own = rates.get(phase_key(f"{node.name}:{p.label}", p.model, p.engine, where))
        rate = own or rates.get(phase_key(p.kind, p.model, p.engine, where))
        if rate is None:
            if p.requests:
                missing.append(f"({p.kind}, {p.model}, {p.engine}, {where})")
            tokens += p.bound_tokens
            continue
        seconds += rate.seconds(p.units)
        tokens += rate.expected_tokens(p.bound_tokens)
    prompt = sum(p.prompt_tokens for p in phases)
    return Prediction(
        node.name,
        phases,
        prompt,
        tokens,
        None if missing else seconds,
        stage_gpus(cfg, node),
        [f"no calibration for {m}" for m in missing],
    )


def predict_plan(plan: RunPlan) -> dict[str, Prediction]:
    """Every selected stage that will run, predicted from the learnt table."""
    table = learn(plan.cfg)
    return {
        n.name: predict(plan.cfg, n, table)
        for n in plan.selected_nodes()
        if not n.done or n.always_run
    }


def save_predictions(plan: RunPlan, predictions: dict[str, Prediction]) -> None:
    """Each stage's prediction where its manifest will find it (`predicted_path`)."""
    for name, pred in predictions.items():
        store.atomic_write_json(predicted_path(plan.run_dir, plan[name].key), pred.as_dict())


def read_prediction(run_dir: str | Path, key: str) -> dict[str, Any] | None:
    path = predicted_path(run_dir, key)
    return store.read_json(path) if path.exists() else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


def prediction_lines(predictions: dict[str, Prediction], where: str) -> list[str]:
    """The predicted table of a plan: tokens, wall time and GPU-hours per stage, totals,
    and what is not calibrated (with the command that calibrates it)."""
    rows = [("stage", "prompt tok", "completion tok", "wall", "GPUs", "GPU-hours")]
    for name, p in predictions.items():
        gh = "?" if p.gpu_hours is None else f"{p.gpu_hours:.2f}"
        rows.append(
            (
                name,
                _tokens(p.prompt_tokens),
                _tokens(p.completion_tokens),
                _duration(p.seconds),
                str(p.gpus),
                gh,
            )
        )
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(len(rows[0]))]
    known = [p for p in predictions.values() if p.seconds is not None]
    missing = sorted({m for p in predictions.values() for m in p.missing})
    total_s = sum(p.seconds or 0.0 for p in known)
    total_gh = sum(p.gpu_hours or 0.0 for p in known)
    partial = f" ({len(predictions) - len(known)} stages not calibrated)" if missing else ""
    lines = [
        f"predicted on {where} (throughput learnt from finished stages):",
        *("  " + "".join(f"{v:<{w}}" for v, w in zip(r, widths)) for r in rows),
        f"predicted wall time: {_duration(total_s)}, GPU-hours: {total_gh:.2f}{partial}",
    ]
    lines += [f"  {m}: run plan=probe" for m in missing]
    return lines
