"""Run every benchmark, print its tables, and write benchmarks/RESULTS.md.

    python -m benchmarks                    # full sizes (tens of minutes on 2 CPU cores)
    python -m benchmarks --quick            # CI mode: under 3 minutes on 2 CPU cores
    python -m benchmarks --only runner data # a subset (names: engines runner train refcache data
                                            # pipeline warm planner prefix)

Each benchmark runs in its own process (`python -m benchmarks.bench_<name> [--quick]`), one
after the other, so a crash or a memory peak in one cannot touch the others, and no two
compete for the CPUs. Benchmarks that can (`--json`) hand back their tables for RESULTS.md;
for the others their printed output is copied as is. A missing `bench_<name>.py` is skipped.
The last line is `benchmarks: N passed, N failed` (plus skipped); the exit status is 1 if
any failed. A missed target is flagged in the tables and the summary, but is not a failure:
on a shared machine a target can be missed by noise, a crash or a wrong result cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import REPO, machine, md_table

HERE = Path(__file__).resolve().parent
# the order of the issue: engines, runner, training, data layer, end to end
BENCHES = (
    *("engines", "runner", "train", "refcache", "data", "pipeline", "warm", "planner", "prefix"),
)
TIMEOUT_S = {"quick": 900, "full": 7200}  # per benchmark; the quick total target is 180 s


def _supports_json(path: Path) -> bool:
    return '"--json"' in path.read_text(encoding="utf-8", errors="replace")


def run_one(name: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run bench_<name>.py in a subprocess, echoing its stdout live; return its record."""
    path = HERE / f"bench_{name}.py"
    rec: dict[str, Any] = {"name": name, "status": "skipped", "seconds": 0.0, "stdout": ""}
    if not path.exists():
        rec["reason"] = f"{path.relative_to(REPO)} not present"
        print(f"\n== {name}: skipped ({rec['reason']}) ==", flush=True)
        return rec
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        json_path = Path(tmp) / "result.json"
        stderr_path = Path(tmp) / "stderr.log"
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}"]
        cmd += ["--quick"] if quick else []
        cmd += ["--json", str(json_path)] if _supports_json(path) else []
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True)
            lines: list[str] = []

            def pump() -> None:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line)
                    print(line, end="", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                lines.append(f"\n(killed after {timeout_s:.0f} s)\n")
            reader.join(timeout=10)
        rec["seconds"] = time.perf_counter() - t
        rec["stdout"] = "".join(lines)
        rec["returncode"] = rc
        if json_path.exists():
            rec["result"] = json.loads(json_path.read_text())
        rec["status"] = "passed" if rc == 0 else "failed"
        if rc != 0:
            tail = stderr_path.read_text(errors="replace").strip().splitlines()[-15:]
            rec["stderr_tail"] = "\n".join(tail)
            print(f"-- {name} failed (exit {rc}); stderr tail:\n" + rec["stderr_tail"], flush=True)
    return rec


def _targets(rec: dict[str, Any]) -> list[dict]:
    return (rec.get("result") or {}).get("targets", [])


def summary_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        targets = _targets(r)
        met = sum(t["met"] for t in targets)
        shown = "; ".join(f"{t['what']}: {t['value']}" for t in targets) or r.get("reason", "-")
        rows.append(
            [
                r["name"],
                r["status"],
                r["seconds"],
                f"{met}/{len(targets)}" if targets else "-",
                shown,
            ]
        )
    return md_table(["benchmark", "status", "seconds", "targets met", "figures"], rows)


EXPERIMENTS = "## Experiments"


def kept_experiments(path: Path) -> list[str]:
    """The experiments section of an existing RESULTS.md (its `## Experiments` heading up to
    the next `## ` heading): the record of long runs (benchmarks/experiments.md) that
    `python -m benchmarks` does not redo."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start = text.find(f"\n{EXPERIMENTS}\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    return ["", text[start + 1 : end if end >= 0 else len(text)].rstrip()]


def write_results(
    path: Path, records: list[dict], info: dict, mode: str, argv: list[str], wall: float
) -> None:
    git = info["git"]
    commit = f"{git['commit'] or 'unknown'}{' (uncommitted changes)' if git.get('dirty') else ''}"
    lines = [
        "# cpt benchmark results",
        "",
        f"Written by `{' '.join(['python -m benchmarks', *argv])}` ({mode} mode) on "
        f"{info['date']}, commit `{commit}`, in {wall:.0f} s. Every ratio compares paths measured "
        "side by side in this one run, on this machine; re-run to refresh.",
        "",
        "## Machine",
        "",
        md_table(
            ["", ""],
            [
                ["CPUs (os.cpu_count / usable)", f"{info['cpu_count']} / {info['cpus_usable']}"],
                ["load average at start (1, 5, 15 min)", info["load_avg_1_5_15"]],
                ["load average at end", info.get("load_end", "n/a")],
                ["platform", info["platform"]],
                ["processor", info["processor"]],
                ["python", info["python"]],
                ["GPU", "none (CPU only)" if not info.get("gpu") else info["gpu"]],
            ],
        ),
        "",
        "## Package versions",
        "",
        md_table(["package", "version"], sorted(info["versions"].items())),
        "",
        "## Summary",
        "",
        summary_table(records),
        "",
    ]
    for r in records:
        res = r.get("result")
        title = res["title"] if res else f"bench_{r['name']}"
        heading = title if title.startswith(f"{r['name']}:") else f"{r['name']}: {title}"
        lines += [f"## {heading}", ""]
        if r["status"] == "skipped":
            lines += [f"Skipped: {r.get('reason', '')}.", ""]
            continue
        lines += [
            f"`python -m benchmarks.bench_{r['name']}{' --quick' if mode == 'quick' else ''}`"
            f": {r['status']} in {r['seconds']:.1f} s.",
            "",
        ]
        if res:
            lines += [f"`{h}`" for h in res.get("header", [])] + [""]
            for t in res["tables"]:
                lines += [t, ""]
            lines += [f"- {n}" for n in res.get("notes", [])]
            lines += [
                f"- target: {t['what']}: {t['value']} ({'met' if t['met'] else '**missed**'})"
                for t in res.get("targets", [])
            ]
            lines += [f"- **error**: {e}" for e in res.get("errors", [])]
            lines.append("")
        else:
            lines += ["```", r["stdout"].strip(), "```", ""]
        if r.get("stderr_tail"):
            lines += ["stderr (tail):", "", "```", r["stderr_tail"], "```", ""]
    counts = {s: sum(r["status"] == s for r in records) for s in ("passed", "failed", "skipped")}
    lines.append(
        f"benchmarks: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    )
    from benchmarks.gpu_check import kept_section  # measured on a GPU machine: keep it

    gpu = kept_section(path)
    lines += kept_experiments(path)  # long runs (benchmarks/experiments.md): keep them too
    path.write_text("\n".join(lines) + "\n" + (f"\n{gpu}" if gpu else ""), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under 3 minutes on 2 cores")
    ap.add_argument("--only", nargs="+", choices=BENCHES, help="run only these benchmarks")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where to write the results")
    ns = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = "quick" if ns.quick else "full"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = machine()
    info["gpu"] = _gpu()
    print(
        f"benchmarks ({mode}): {info['cpu_count']} CPUs, load {info['load_avg_1_5_15']}, "
        f"{info['platform']}, python {info['python']}, commit {(info['git']['commit'] or '?')[:12]}",
        flush=True,
    )
    started = time.perf_counter()
    records = [run_one(n, ns.quick, TIMEOUT_S[mode]) for n in (ns.only or BENCHES)]
    wall = time.perf_counter() - started
    info["load_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print("\n== summary ==")
    print(summary_table(records))
    write_results(Path(ns.out), records, info, mode, argv, wall)
    passed = sum(r["status"] == "passed" for r in records)
    failed = sum(r["status"] == "failed" for r in records)
    skipped = sum(r["status"] == "skipped" for r in records)
    print(f"\nwrote {ns.out} ({wall:.0f} s in all)")
    print(f"benchmarks: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


def _gpu() -> str:
    from cpt.gpus import driver_gpu_names

    return ", ".join(driver_gpu_names())


if __name__ == "__main__":
    sys.exit(main())
