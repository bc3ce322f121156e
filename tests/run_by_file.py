"""Run the suite one test file per pytest process (`make test` calls this).

Why: several files start real services inside the pytest process (a Ray session joined to
a fake-GPU head, vLLM engines, DeepSpeed process groups, Slurm jobs). Run in one process,
state one file leaves behind (a Ray session whose head is gone, threads, env) can fail the
tests of a later file that pass alone. One process per file keeps each file's world its own.

Prints each file's result, then one closing line `tests: N passed, N failed, N skipped`.
Exit status: 0 when at least one test ran and none failed or errored; 5 (pytest's "no tests
ran") when none ran; 1 otherwise.

    python tests/run_by_file.py [pytest options ...] [test files or folders ...]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def counts(junit: Path) -> dict[str, int]:
    """passed / failed / skipped from pytest's JUnit XML (errors count as failed)."""
    if not junit.is_file():
        return {"passed": 0, "failed": 1, "skipped": 0}  # pytest died before writing it
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - skipped - failed, "failed": failed, "skipped": skipped}


def main(argv: list[str]) -> int:
    # paths given (files or folders) are the targets, one process each; the rest is options
    files = [a for a in argv if not a.startswith("-") and Path(a.split("::")[0]).exists()]
    args = [a for a in argv if a not in files]
    files = files or sorted(str(p) for p in TESTS.glob("test_*.py"))
    total = {"passed": 0, "failed": 0, "skipped": 0}
    failed_files = []
    with tempfile.TemporaryDirectory(prefix="cpt-junit-") as tmp:
        for i, f in enumerate(files):
            junit = Path(tmp) / f"{i}.xml"
            start = time.time()
            rc = subprocess.call([sys.executable, "-m", "pytest", *args, f, f"--junitxml={junit}"])
            got = counts(junit) if rc != 5 else {"passed": 0, "failed": 0, "skipped": 0}
            if rc not in (0, 5) and got["failed"] == 0:  # pytest itself failed (usage, crash)
                got["failed"] = 1
            for k in total:
                total[k] += got[k]
            if got["failed"]:
                failed_files.append(f)
            print(
                f"== {f}: {got['passed']} passed, {got['failed']} failed, "
                f"{got['skipped']} skipped in {time.time() - start:.0f} s",
                flush=True,
            )
    if failed_files:
        print("files with failures: " + ", ".join(failed_files))
    ran = total["passed"] + total["failed"]
    print(f"tests: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    if ran == 0:
        print("tests: no tests ran")
        return 5
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
