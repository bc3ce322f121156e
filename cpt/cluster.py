"""The cluster environment of one job: torch.distributed variables from Slurm (or a
single process), and a Ray cluster over the job's nodes (Ray on Slurm). Training and
the Slurm stage jobs both start from here; nothing here knows about stages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cpt import store

log = logging.getLogger(__name__)


class ClusterError(store.StoreError):
    """Ray could not be started over the job's nodes; the message says which part failed."""


def free_port() -> int:
    """A TCP port free on this host now (for a Ray head or a torch.distributed master)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ torch.distributed


def distributed_env_from_slurm() -> dict[str, str]:
    """Export RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for
    `torch.distributed` (env://) from Slurm, and return them.

    - Already set (torchrun, or a launcher that set RANK and WORLD_SIZE): left as they are.
    - Inside a submitit task: `submitit.helpers.TorchDistributedEnvironment` (master = first host
      of the job, port from MASTER_PORT or derived from the job id).
    - Under plain `srun`: the same mapping from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
      first host of SLURM_JOB_NODELIST (submitit's node-list parser), same port rule.
    - Neither: nothing is exported (single process) and {} is returned.

    CUDA_VISIBLE_DEVICES is not touched: with one task per GPU, the device is `cuda:LOCAL_RANK`.
    """
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return {k: os.environ[k] for k in keys if k in os.environ}
    if "SLURM_PROCID" not in os.environ:
        return {}
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment()
        values = {
            "RANK": env.rank,
            "LOCAL_RANK": env.local_rank,
            "WORLD_SIZE": env.world_size,
            "LOCAL_WORLD_SIZE": env.local_world_size,
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": env.master_port,
        }
    else:
        from submitit.slurm.slurm import SlurmJobEnvironment

        job = SlurmJobEnvironment()
        port = os.environ.get("MASTER_PORT") or random.Random(job.job_id).randint(20000, 60000)
        values = {
            "RANK": job.global_rank,
            "LOCAL_RANK": job.local_rank,
            "WORLD_SIZE": job.num_tasks,
            "LOCAL_WORLD_SIZE": max(1, job.num_tasks // max(1, job.num_nodes)),
            "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": port,
        }
    values = {k: str(v) for k, v in values.items()}
    os.environ.update(values)
    return values


def ensure_single_process_env() -> None:
    # DeepSpeed always initialises torch.distributed (env://), even for one process.
    if "RANK" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
        )


# ------------------------------------------------------------------ Ray on Slurm


def _job_hostnames() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    if nodelist:
        from submitit.slurm.slurm import _parse_node_list

        with contextlib.suppress(Exception):
            return _parse_node_list(nodelist)
    return [socket.gethostname()]


def _ray_bin() -> str:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


def _wait_port(host: str, port: int, deadline: float, proc: subprocess.Popen) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ClusterError(
                f"ray head exited with {proc.returncode} before {host}:{port} opened"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.5)
    raise ClusterError(f"ray head did not open {host}:{port} in time")


def _alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        ray.shutdown()


def _stop(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its processes on TERM
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def ray_cluster(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    port: int = 0,
    timeout_s: float = 180.0,
) -> Iterator[str]:
    """A Ray cluster over this job's nodes; yields its address (also exported as RAY_ADDRESS).

    Run it on the allocation's first node (the batch shell or task 0). The head starts here
    with `ray start --head --block`; with more nodes, `srun --nodes=N-1 --ntasks-per-node=1
    ray start --address=... --block` starts one worker per other node. At exit both are
    sent SIGTERM (which makes `ray start --block` stop what it started) rather than running
    `ray stop`, which would also kill other jobs' Ray on a shared node. The cluster uses
    Ray's token authentication unless RAY_AUTH_MODE is set (`_auth_env`).
    """
    nodes = _job_hostnames()
    n_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", len(nodes)) or 1)
    head = nodes[0]
    ip = "127.0.0.1" if n_nodes == 1 else socket.gethostbyname(head)
    port = port or free_port()
    address = f"{ip}:{port}"
    if num_cpus is None:
        num_cpus = int(
            os.environ.get("SLURM_CPUS_ON_NODE") or os.environ.get("SLURM_CPUS_PER_TASK") or 0
        ) or (os.cpu_count() or 1)
    if num_gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        num_gpus = len([d for d in visible.split(",") if d.strip()]) if visible else 0
    tag = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    temp_dir = f"/tmp/ray-cpt-{tag}"
    auth = _auth_env()
    env = {
        **os.environ,
        **auth,
        # the whole cluster goes at once: no point draining a node (up to 30 s) on SIGTERM
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": os.environ.get(
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0"
        ),
    }
    common = [f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", "--disable-usage-stats"]
    head_cmd = [
        _ray_bin(),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={ip}",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        *common,
    ]
    log.info("ray head on %s: %s", head, " ".join(head_cmd))
    head_proc = subprocess.Popen(head_cmd, env=env, start_new_session=True)
    workers: subprocess.Popen | None = None
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", *auth)}
    os.environ.update(auth)  # this process (the driver) joins with the same token
    _refresh_ray_config()
    try:
        deadline = time.time() + timeout_s
        _wait_port(ip, port, deadline, head_proc)
        if n_nodes > 1:
            worker_cmd = [
                "srun",
                f"--nodes={n_nodes - 1}",
                "--ntasks-per-node=1",
                f"--exclude={head}",
                "--overlap",
                _ray_bin(),
                "start",
                f"--address={address}",
                "--block",
                *common,
            ]
            log.info("ray workers: %s", " ".join(worker_cmd))
            workers = subprocess.Popen(worker_cmd, env=env, start_new_session=True)
            while _alive_nodes(address) < n_nodes:
                if workers.poll() is not None:
                    raise ClusterError(f"ray workers (srun) exited with {workers.returncode}")
                if time.time() > deadline:
                    raise ClusterError(f"only some of {n_nodes} nodes joined ray at {address}")
                time.sleep(2)
        os.environ["RAY_ADDRESS"] = address
        log.info("ray cluster up at %s (%d node(s))", address, n_nodes)
        yield address
    finally:
        with contextlib.suppress(Exception):
            import ray

            if ray.is_initialized():
                ray.shutdown()
        _stop(workers)
        _stop(head_proc)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        log.info("ray cluster at %s stopped", address)


def _refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE when it is imported; one imported before the token was set
    re-reads it (what Ray itself does when it turns token auth on)."""
    if "ray" in sys.modules:
        with contextlib.suppress(Exception):
            from ray._raylet import Config

            Config.initialize("")


def _auth_env() -> dict[str, str]:
    """Ray's token authentication with a fresh random token (from `secrets`, passed through
    the environment to the head, the srun workers and this driver; written nowhere), unless
    RAY_AUTH_MODE is set: without it, anyone who reaches the head's port runs code as you."""
    import secrets

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return {"RAY_AUTH_MODE": mode}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
