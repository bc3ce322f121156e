"""CI guards: a test run that tests nothing fails, and installs are pinned.

pytest tests/test_ci.py -q
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_fails_when_no_test_ran(tmp_path):
    marker = ".venv/.installed-dev,cpu-vllm"  # taken as built: this test installs nothing
    proc = subprocess.run(
        ["make", "-o", marker, "test", "EXTRAS=dev,cpu-vllm", f"PY={sys.executable}",
         f"PYTEST_ARGS={tmp_path} -p no:cacheprovider -q"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "no tests ran" in proc.stdout and "Error 5" in proc.stderr
    assert "make test" in (REPO / ".ci" / "run").read_text()  # and CI runs exactly that


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_constraints_pin_every_package_once(kind):
    path = REPO / ".ci" / f"constraints-{kind}.txt"
    lines = [s for s in path.read_text().splitlines() if s and not s.startswith("#")]
    names = [re.split(r"==", s)[0].lower().replace("_", "-") for s in lines]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9.]+", s) for s in lines), lines
    assert len(names) == len(set(names))
    for must in ("torch", "transformers", "tokenizers", "trl", "peft", "ray", "hydra-core"):
        assert must in names, f"{path.name} does not pin {must}"
    makefile = (REPO / "Makefile").read_text()
    assert (
        "CONSTRAINTS ?= .ci/constraints-$(KIND).txt" in makefile and "-c $(CONSTRAINTS)" in makefile
    )


def test_readme_says_how_to_refresh_the_constraints():
    text = (REPO / "README.md").read_text()
    assert "make constraints" in text and Path(REPO / ".ci" / "constraints-cpu.txt").exists()
