"""bench_prefix: prefix-cache-aware generation on vs off, same rows, real model, vLLM.

Two workloads, built and run as the stages build and run them: `generate` (the teacher phi
over tasks x rubrics x levels plus the no-rubric baseline: `cpt.workload.teacher_grid`,
`GenerateFactory` workers) and `adherence` (the judge over fixed responses, the same text
on every side: `cpt.stages.adherence.work_grid`, `JudgeFactory` workers with their retries),
one engine call per shard as in the stages. Sides:

- `off`: `prompts.prefix_layout=false engine.prefix_caching=false`: the old layout, rows in
  id order, vLLM's prefix cache off;
- `on`: the defaults: targets after the task, the judge's task block with its own nonce,
  requests sorted by prompt, vLLM's prefix cache on;
- `cache_only` (full mode): the old layout with the cache on (and sorted): what the layout
  adds over the cache alone. vLLM 0.32 turns its prefix cache on by default for decoder models,
  so this side is close to how cpt ran before the switch (which did not sort).

Each side runs in its own process (one fresh engine for both workloads; its load is not
timed), warms up on two short prompts, then runs generate and adherence with the prefix cache
emptied before each. Figures: completion tokens per second of the workers' wall time, prompt
tokens, prefill tokens computed (prompt tokens minus those served from the cache), the hit
rate. Target: `on` >= 1.3x `off` in tok/s on both workloads.

    python -m benchmarks.bench_prefix            # SmolLM2-135M, 6 tasks (the local default grid), 3 sides
    python -m benchmarks.bench_prefix --quick    # SmolLM2-135M, 2 tasks, short answers, no repairs, on/off
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import REPO, compose, finish, load_avg, md_table

SIDES = {
    "off": ("prompts.prefix_layout=false", "engine.prefix_caching=false"),
    "on": ("prompts.prefix_layout=true", "engine.prefix_caching=true"),
    "cache_only": ("prompts.prefix_layout=false", "engine.prefix_caching=true"),
}
TARGET = 1.3
NONCE_KEY = b"bench-prefix-fixed-judge-key-32b"  # the same judge prompts on every run
SENTENCES = (
    "The morning light fell across the harbour and the boats rocked gently at their moorings.",
    "A gull circled twice, then settled on the railing to watch the fishermen mend their nets.",
    "Somewhere a bell rang out the hour, and the market stalls began to open one by one.",
    "The baker set out loaves still warm from the oven, their crusts cracked and golden.",
    "Children ran between the stalls, chasing a dog that had stolen a string of sausages.",
)


def overrides(ns: argparse.Namespace, side: str) -> list[str]:
    """The config of one side: the model, the grid size, the answer lengths, the switches."""
    return [
        f"teacher={ns.model}",
        f"judge={ns.model}",
        "engine=vllm",
        "rubrics=tiny",
        f"tasks.num_tasks={ns.tasks}",
        f"teacher.sampling.max_new_tokens={ns.gen_tokens}",
        f"judge.sampling.max_new_tokens={ns.judge_tokens}",
        f"adherence.max_attempts={1 if ns.quick else 3}",  # quick: no repair round
        *SIDES[side],
    ]


def responses(gen_rows: list[dict]) -> list[dict]:
    """A fixed response per generation row (3-5 sentences, varied), for the judge workload."""
    out = []
    for i, r in enumerate(gen_rows):
        text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3 + i % 3))
        out.append({**r, "text": text, "ok": True, "finish_reason": "stop"})
    return out


def run_side(ns: argparse.Namespace) -> dict[str, Any]:
    """One side in this process: both workloads through one engine; figures per workload."""
    import cpt.engines
    from cpt.engines import Request, Sampling
    from cpt.generation import GenerateFactory
    from cpt.parallel import plan_shards
    from cpt.stages import adherence
    from cpt.workload import load_config_tasks, teacher_grid

    cfg = compose(*overrides(ns, ns.side))
    tasks = [{"id": t.task_id, "text": t.text, "genre": t.genre} for t in load_config_tasks(cfg)]
    gen_rows = teacher_grid(cfg, tasks)
    task_text = {t["id"]: t["text"] for t in tasks}
    judge_rows = adherence.work_grid(cfg, task_text, responses(gen_rows), NONCE_KEY)
    t0 = time.perf_counter()
    engine = cpt.engines.build_engine(cfg.teacher, cfg.engine)
    load_s = time.perf_counter() - t0
    workers = {  # both workers around the one loaded engine (`bind`, as warm engines do)
        "generate": (GenerateFactory(cfg.teacher, cfg.engine).bind(engine), gen_rows, 32),
        "adherence": (adherence.judge_factory(cfg, cfg.adherence).bind(engine), judge_rows, 32),
    }
    warm = [Request(f"w{i}", ({"role": "user", "content": f"Say hi {i}."},)) for i in range(2)]
    engine.generate([Request(r.id, r.messages, Sampling(8, 0.0)) for r in warm])
    figures: dict[str, Any] = {"load_s": load_s}
    print(f"side {ns.side}: engine loaded in {load_s:.0f} s", file=sys.stderr, flush=True)
    for name, (worker, rows, shard_size) in workers.items():
        engine.llm.reset_prefix_cache()
        shards = plan_shards([r["id"] for r in rows], shard_size)
        t0 = time.perf_counter()
        out = [o for idx in shards for o in worker([rows[j] for j in idx])]
        seconds = time.perf_counter() - t0
        prompt = sum(o["prompt_tokens"] for o in out)
        cached = sum(o["cached_tokens"] or 0 for o in out)
        figures[name] = {
            "rows": len(out),
            "seconds": seconds,
            "completion_tokens": sum(o["completion_tokens"] for o in out),
            "prompt_tokens": prompt,
            "prefill_tokens": prompt - cached,
            "hit_rate": cached / prompt if prompt else 0.0,
            "failures": sum(o["ok"] is False for o in out),
        }
        print(f"side {ns.side}: {name}: {figures[name]}", file=sys.stderr, flush=True)
    engine.close()
    return figures


def spawn(ns: argparse.Namespace, side: str) -> dict[str, Any]:
    """Run one side in a child process (a fresh engine and allocator) and read its figures."""
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_prefix", "--side", side, "--side-json",
               str(out), "--model", ns.model, "--tasks", str(ns.tasks), *(["--quick"] if ns.quick else []),
               "--gen-tokens", str(ns.gen_tokens), "--judge-tokens", str(ns.judge_tokens)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL)  # log: stderr
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"side {side} failed (exit {proc.returncode}); its log is above")
        return json.loads(out.read_text())


def table(runs: dict[str, dict], workload: str) -> str:
    base = runs["off"][workload]
    rows = []
    for side, figs in runs.items():
        f = figs[workload]
        tok_s = f["completion_tokens"] / f["seconds"]
        rows.append(
            [side, f["rows"], f["seconds"], f"{base['seconds'] / f['seconds']:.2f}x",
             f["completion_tokens"], tok_s,
             f"{tok_s / (base['completion_tokens'] / base['seconds']):.2f}x",
             f["prompt_tokens"], f["prefill_tokens"], f"{f['hit_rate']:.1%}", f["failures"]]
        )  # fmt: skip
    return md_table(
        ["side", "rows", "seconds", "time vs off", "tokens", "tok/s", "tok/s vs off",
         "prompt tok", "prefill tok computed", "hit rate", "failures"],
        rows,
    )  # fmt: skip


def main(ns: argparse.Namespace) -> dict[str, Any]:
    sides = ns.sides or (("off", "on") if ns.quick else ("off", "on", "cache_only"))
    runs: dict[str, dict] = {}
    errors: list[str] = []
    for side in sides:
        try:
            runs[side] = spawn(ns, side)
        except RuntimeError as exc:
            errors.append(str(exc))
    header = [
        f"model={ns.model}  engine=vllm (cpu={not _cuda()})  rubrics=tiny (2)  tasks={ns.tasks}  "
        f"levels=3  teacher max_new_tokens={ns.gen_tokens}  judge max_new_tokens="
        f"{ns.judge_tokens}  shard_size=32  load_avg={load_avg()}",
    ]
    tables, targets, figures = [], [], {}
    if "off" in runs and "on" in runs:
        for workload in ("generate", "adherence"):
            tables.append(f"{workload}:\n\n{table(runs, workload)}")
            on, off = runs["on"][workload], runs["off"][workload]
            ratio = (on["completion_tokens"] / on["seconds"]) / (
                off["completion_tokens"] / off["seconds"]
            )
            figures[workload] = {side: figs[workload] for side, figs in runs.items()}
            targets.append(
                {"what": f"{workload}: prefix-aware on vs off, tok/s (target >= {TARGET}x)",
                 "value": f"{ratio:.2f}x", "met": ratio >= TARGET}
            )  # fmt: skip
            print(f"{workload}: on/off tok/s ratio {ratio:.2f}x: target "
                  f"{'met' if ratio >= TARGET else 'missed'}")  # fmt: skip
    notes = [
        "tok/s = completion tokens / wall seconds of the worker calls (one per shard of 32 rows), "
        "engine load excluded; the prefix cache is emptied before each workload",
        "prefill tok computed = prompt tokens - prompt tokens vLLM served from its prefix cache "
        "(`num_cached_tokens`, the figure the stages sum into `prefix_cache.hit_rate`)",
        "same rows on every side: the same tasks, conditions and ids; the judge grades the same "
        "fixed responses; the teacher's prompt text differs only by the layout",
        "the judge's prompt tokens count every attempt (repairs included), as its stage does",
        "time vs off: the same rows' wall time, off / this side; beside tok/s because the sides' "
        "prompts differ, so their answers (and repairs) differ in length: a side that writes "
        "fewer tokens for the same judgements shows a lower tok/s for the same work (the "
        "target stays on tok/s, as the issue states it)",
    ]
    return {
        "name": "prefix",
        "title": "prefix: prefix-cache-aware layout + sorted requests + vLLM prefix cache, on vs off",
        "header": header,
        "tables": tables,
        "notes": notes,
        "figures": figures,
        "targets": targets,
        "errors": errors,
        "ok": not errors,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 tasks, short answers, on/off only")
    ap.add_argument(
        "--model", default="smollm2_135m", help="teacher and judge preset (conf/models)"
    )
    ap.add_argument("--tasks", type=int, default=0, help="shipped tasks; 0: 6 (2 with --quick)")
    ap.add_argument("--gen-tokens", type=int, default=0, help="0: 160 (32 with --quick)")
    ap.add_argument("--judge-tokens", type=int, default=0, help="0: 160 (64 with --quick)")
    ap.add_argument(
        "--sides", nargs="+", choices=sorted(SIDES), help="default: all (off on: quick)"
    )
    ap.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--side-json", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    ns.tasks = ns.tasks or (2 if ns.quick else 6)
    ns.gen_tokens = ns.gen_tokens or (32 if ns.quick else 160)
    ns.judge_tokens = ns.judge_tokens or (64 if ns.quick else 160)
    if ns.side:  # a child: one side, figures as JSON
        Path(ns.side_json).write_text(json.dumps(run_side(ns)))
        sys.exit(0)
    sys.exit(finish(main(ns), ns.json))
