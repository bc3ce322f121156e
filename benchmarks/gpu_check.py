"""The one-GPU debug profile end to end, measured: run by `benchmarks/gpu_check.sh`.

    python -m benchmarks.gpu_check [--out benchmarks/RESULTS.md] [override ...]

Runs every stage of `experiment=debug_gpu1` (vLLM teacher/judge/student, QLoRA 4-bit +
paged_adamw_8bit training) in this one process, as `jobs/launch.py` would, and measures:
- decode tokens/s per stage: completion tokens over the seconds the engines spent on shards
  (the shard receipts; engine start-up excluded),
- peak GPU memory in use during each stage (whole device, every process, sampled by NVML),
- free GPU memory after each stage, once the stage's engines are gone: it must come back
  to >= 90 % before the next stage (vLLM hands its memory to training and back),
- wall time of the whole run (target < 8 min).
The figures go to a "GPU check" section of RESULTS.md; the exit code is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FREE_TARGET = 0.90  # share of GPU memory free between stages
WALL_TARGET_S = 8 * 60
SETTLE_S = 60.0  # a killed actor's memory is returned asynchronously: wait this long at most
SECTION = "## GPU check (one GPU, experiment=debug_gpu1)"


class GpuMemory:
    """Device-wide memory of GPU 0 through NVML (no CUDA context of its own), sampled by a
    background thread so a stage's peak is seen even between log lines."""

    def __init__(self, every_s: float = 0.2) -> None:
        pynvml = nvml_module()
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.total = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total
        self.peak = 0
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def used(self) -> int:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(self.every_s)

    def reset_peak(self) -> None:
        self.peak = self.used()

    def free_share_settled(self) -> float:
        """Free share once it reaches the target, or after SETTLE_S (whatever it is then)."""
        deadline = time.time() + SETTLE_S
        while True:
            free = 1 - self.used() / self.total
            if free >= FREE_TARGET or time.time() > deadline:
                return free
            time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def nvml_module():
    """NVML bindings: nvidia-ml-py if installed, else the copy vLLM ships."""
    try:
        import pynvml
    except ImportError:
        from vllm.third_party import pynvml
    return pynvml


@dataclass
class StageFigures:
    name: str
    seconds: float
    tokens: int
    decode_s: float
    peak_gib: float
    free_after: float

    @property
    def tok_s(self) -> str:
        return f"{self.tokens / self.decode_s:.0f}" if self.decode_s > 0 and self.tokens else "-"


def decode_figures(stage_dir: Path) -> tuple[int, float]:
    """Completion tokens and engine seconds over every shard receipt of a stage folder."""
    tokens, seconds = 0, 0.0
    for receipt in stage_dir.rglob("shards/part-*.json"):
        r = json.loads(receipt.read_text())
        tokens += int(r.get("tokens", 0))
        seconds += float(r.get("seconds", 0.0))
    return tokens, seconds


def preflight() -> str:
    """One line per missing piece, or the device name; exits early with a clear message."""
    problems = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device (is this the GPU machine? nvidia-smi?)")
    except ImportError:
        problems.append("torch is not installed (make setup on the GPU machine)")
    for module, why in [
        ("vllm", "the engine of the profile"),
        ("bitsandbytes", "QLoRA 4-bit and paged_adamw_8bit"),
    ]:
        try:
            __import__(module)
        except ImportError:
            problems.append(f"{module} is not installed ({why}); install the [gpu] extra")
    if problems:
        sys.exit("gpu_check: " + "; ".join(problems))
    import torch

    return torch.cuda.get_device_name(0)


def kept_section(path: Path) -> str:
    """The GPU check section of RESULTS.md ("" if none): the CPU benchmarks rewrite the
    file and carry it over, since it can only be measured on a GPU machine."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION)
    if start < 0:
        return ""
    end = old.find("\n## ", start + len(SECTION))
    return old[start : end if end >= 0 else len(old)].rstrip("\n") + "\n"


def write_results(path: Path, text: str) -> None:
    """Replace (or append) the GPU check section of RESULTS.md."""
    old = path.read_text() if path.exists() else ""
    start = old.find(SECTION)
    if start >= 0:
        end = old.find("\n## ", start + len(SECTION))
        old = old[:start] + (old[end + 1 :] if end >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def compose(overrides: list[str]):
    """The config exactly as jobs/launch.py composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cpt.config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/cpt-gpu-check"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of the profile")
    args = parser.parse_args(argv)
    device = preflight()

    sys.path.insert(0, str(REPO))
    from cpt import pipeline
    from cpt.config import validate

    overrides = ["experiment=debug_gpu1", f"run_dir={args.run_dir}", *args.overrides]
    cfg = compose(overrides)
    problems = validate(cfg)
    if problems:
        sys.exit("gpu_check: config: " + "; ".join(problems))
    print(f"gpu_check: {device}; overrides: {' '.join(overrides)}", flush=True)

    mem = GpuMemory()
    gib = 1024**3
    free_before = 1 - mem.used() / mem.total
    figures: list[StageFigures] = []
    started = time.time()
    try:
        for name in pipeline.stage_specs():
            mem.reset_peak()
            t0 = time.time()
            out = pipeline.run_stage(cfg, name)
            seconds = time.time() - t0
            peak = mem.peak
            free = mem.free_share_settled()
            tokens, decode_s = decode_figures(out)
            figures.append(StageFigures(name, seconds, tokens, decode_s, peak / gib, free))
            print(
                f"gpu_check: {name}: {seconds:.1f} s, peak {peak / gib:.1f} GiB, "
                f"free after {free:.1%}, decode {figures[-1].tok_s} tok/s",
                flush=True,
            )
    finally:
        mem.close()
    wall = time.time() - started

    low = [f for f in figures if f.free_after < FREE_TARGET]
    ok = not low and wall < WALL_TARGET_S
    rows = "\n".join(
        f"| {f.name} | {f.seconds:.1f} | {f.tokens} | {f.tok_s} | {f.peak_gib:.1f} | "
        f"{f.free_after:.1%} |"
        for f in figures
    )
    text = f"""{SECTION}

`bash benchmarks/gpu_check.sh` on {device} ({mem.total / gib:.0f} GiB), {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.
Overrides: `{" ".join(overrides)}`. Free before the run: {free_before:.1%}.

| stage | seconds | completion tokens | decode tok/s | peak GPU memory (GiB, whole device) | free after the stage |
|---|---|---|---|---|---|
{rows}

- whole run: {wall:.0f} s (target < {WALL_TARGET_S} s): {"met" if wall < WALL_TARGET_S else "MISSED"}
- free GPU memory between stages >= {FREE_TARGET:.0%}: {"met" if not low else "MISSED after " + ", ".join(f.name for f in low)}
- decode tok/s = completion tokens / engine seconds on shards (start-up excluded)
"""
    write_results(args.out, text)
    print(text, flush=True)
    print(f"gpu_check: {'PASSED' if ok else 'FAILED'}; figures written to {args.out}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
