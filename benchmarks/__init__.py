"""cpt benchmarks: every figure a ratio of two paths measured side by side in one run.

    python -m benchmarks            # all benchmarks, full sizes; writes benchmarks/RESULTS.md
    python -m benchmarks --quick    # the CI mode: under 3 minutes on 2 CPU cores

Each `bench_*.py` also runs alone (`python -m benchmarks.bench_runner --quick`). This package
holds what they share: composing the config as `jobs/launch.py` does, the machine
description, and Markdown tables that read well on a terminal too.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(*overrides: str):
    """The composed config (dataclasses) for these overrides, as jobs/launch.py sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cpt.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(hydra_compose(config_name="config", overrides=list(overrides)))


def load_avg() -> str:
    """The 1, 5 and 15 min load averages, printed beside every timing (a busy box explains
    a slow figure)."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, Any]:
    """Where the numbers were taken: CPUs, platform, Python, package versions, commit, date."""
    from cpt import store

    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus_usable = os.cpu_count()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable,
        "load_avg_1_5_15": load_avg(),  # a shared machine: other jobs slow every path alike
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "versions": store.package_versions(),
        "git": store.git_commit(),
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns (numbers right-aligned): readable raw and rendered."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_num(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric))
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def finish(result: dict[str, Any], json_path: str | None) -> int:
    """Print a benchmark's tables and notes, write its JSON for `benchmarks.run`, exit status."""
    print(f"\n== {result['title']} ==")
    for line in result.get("header", []):
        print(line)
    for t in result["tables"]:
        print(t)
        print()
    for note in result.get("notes", []):
        print(f"note: {note}")
    for target in result.get("targets", []):
        print(
            f"target: {target['what']}: {target['value']} ({'met' if target['met'] else 'MISSED'})"
        )
    for err in result.get("errors", []):
        print(f"error: {err}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("ok", True) else 1
