"""GPU scheduling without a GPU: a real Ray head advertising 2 fake GPUs.

Actors that ask for GPUs get them (Ray only counts), and run on CPU. What this pins:
placement groups are removed with the replica pool (the next stage, or a replacement
replica, finds the GPUs free), replicas = floor(GPUs / model.gpus), a replica asking for
more GPUs than the cluster has fails at once, and the real pipeline with every model
asking for 1 GPU finishes end to end (it used to stall at `sysprompts`).

The head runs in its own process group, killed by group at teardown (never `ray stop`:
that would kill every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, launch

from cpt import replicas, store
from cpt.parallel import run_sharded
from cpt.replicas import Resources, check_gpus

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import Square, read_all, rows  # picklable workers, by module name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gpu_head(num_gpus: int, num_cpus: int, temp_dir: Path) -> Iterator[str]:
    """`ray start --head --num-gpus=N` in its own session; yields its address."""
    port = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # workers unpickle the test's worker factories and import cpt by module name
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_bin) if ray_bin.exists() else "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-gpus={num_gpus}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {proc.stderr.read().decode()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.time() > deadline:
                raise RuntimeError("ray head did not open its port in 120 s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[str]:
    with fake_gpu_head(2, 4, tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.fixture
def on_head(head, monkeypatch) -> Iterator[str]:
    """This process's Ray session joined to the fake-GPU head (a local one is left first)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setattr(replicas, "PG_READY_TIMEOUT_S", 60.0)  # a leak fails, not hangs
    replicas.init_ray(head)
    yield head
    ray.shutdown()  # later tests start their own local Ray again


def _gpus_back(ray_module) -> None:
    """Every GPU free again and no placement group left alive."""
    deadline = time.time() + 30
    while ray_module.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray_module.available_resources().get("GPU", 0) == 2
    from ray.util import placement_group_table

    assert {g["state"] for g in placement_group_table().values()} <= {"REMOVED"}


def test_replicas_fill_the_gpus_and_give_them_back(tmp_path, on_head):
    import ray

    data = rows(24)
    for k, (gpus, n) in enumerate([(1, 2), (2, 1), (1, 2)]):  # stage after stage
        out = tmp_path / f"stage{k}"
        stats = run_sharded(
            data,
            out,
            3,
            Square(delay_s=0.3),
            replicas=0,
            resources=Resources(cpus=1, gpus=gpus),
            ray_address=on_head,
        )
        got = read_all(out, stats.n_shards)
        assert sorted(r["id"] for r in got) == sorted(r["id"] for r in data)
        assert len({r["pid"] for r in got}) == n  # floor(2 GPUs / gpus per replica)
        _gpus_back(ray)


def test_dead_replica_gives_its_gpu_to_the_replacement(tmp_path, on_head):
    import ray

    marker = tmp_path / "die"
    marker.write_text("x")
    data = rows(12)
    out = tmp_path / "out"
    stats = run_sharded(
        data,
        out,
        3,
        Square(die_in=str(marker), delay_s=0.2),
        replicas=2,
        resources=Resources(cpus=1, gpus=1),
        ray_address=on_head,
    )
    # the replacement could only start on the dead replica's GPU (the other one is busy)
    assert stats.retried_shards == 1 and not marker.exists()
    assert sorted(r["id"] for r in read_all(out, 4)) == sorted(r["id"] for r in data)
    _gpus_back(ray)


def test_more_gpus_than_the_cluster_has_fails_at_once(tmp_path, on_head):
    assert check_gpus({"teacher.gpus": 2, "judge.gpus": 3, "student.gpus": 0}, on_head) == [
        f"judge.gpus=3 but the Ray cluster at {on_head} has 2 GPUs (set judge.gpus=0 to run "
        "on CPU, or point parallel.address at a cluster with GPUs)"
    ]
    with pytest.raises(store.StoreError, match=r"needs 3 GPUs but the Ray cluster at \S+ has 2"):
        run_sharded(
            rows(4), tmp_path, 2, Square(), resources=Resources(gpus=3), ray_address=on_head
        )


def test_gpus_on_a_machine_without_any_is_a_launch_error(tmp_path):
    proc = launch(
        f"run_dir={tmp_path}",
        "teacher.gpus=1",
        check=False,
        env={"CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "teacher.gpus=1 but this machine has 0 GPUs" in proc.stderr
    assert not (tmp_path / "generate").exists()


@pytest.mark.slow
def test_pipeline_on_two_fake_gpus_every_model_asking_for_one(tmp_path, head):
    run_dir = tmp_path / "run"
    proc = launch(
        f"parallel.address={head}",
        "teacher.gpus=1",
        "judge.gpus=1",
        "student.gpus=1",
        "engine.replicas=0",  # as many replicas as the GPUs allow: 2
        "generate.shard_size=8",  # 28 rows: 4 shards, enough for both replicas
        f"run_dir={run_dir}",
        "tasks.num_tasks=4",
        "tasks.test_fraction=0.25",
        "train.max_steps=2",
        "evaluate.samples=1",
        "report.n_boot=50",
        timeout=900,
    )
    assert (run_dir / "report" / "report.md").is_file(), proc.stderr[-3000:]
    assert "generate: 2 replica(s), 1 GPU" in proc.stdout + proc.stderr  # both fake GPUs
