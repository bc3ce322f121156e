"""When the Ray session dies under a stage, the run ends with a one-line cause (not a silent
exit 60 s later, which is what Ray itself does to a driver whose head is gone).

    pytest tests/test_ray_session.py -q -m slow
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

DRIVER = """
import sys, time
from pathlib import Path
import cpt.parallel
from cpt.parallel import run_sharded
from cpt.store import StoreError

cpt.parallel.HEAD_LOST_S = 5.0

def factory():
    def work(rows):
        time.sleep(1)
        return [{"id": r["id"]} for r in rows]
    return work

rows = [{"id": f"r{i:03d}"} for i in range(60)]
try:
    run_sharded(rows, Path(sys.argv[2]), 2, factory, replicas=1, ray_address=sys.argv[1])
except StoreError as exc:  # what jobs/launch.py does with it
    sys.exit(f"cpt: error: {exc}")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_dead_ray_head_ends_the_stage_with_one_line(tmp_path):
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         f"--temp-dir=/tmp/ray-cpt-t{port}", "--include-dashboard=false", "--disable-usage-stats",
         "--num-cpus=1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        while True:
            assert head.poll() is None, "ray head exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        out = tmp_path / "out"
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, f"127.0.0.1:{port}", str(out)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while len(list((out / "shards").glob("part-*.json"))) < 2:
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # the session dies under the stage
        head.wait()
        shutil.rmtree(f"/tmp/ray-cpt-t{port}", ignore_errors=True)
    _, stderr = driver.communicate(timeout=240)
    last = stderr.strip().splitlines()[-1]
    assert driver.returncode == 1
    assert last.startswith("cpt: error: ") and "the Ray session at" in last, stderr[-3000:]
    assert "finished shards are kept, re-run to continue" in last
