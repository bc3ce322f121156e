"""Shared fixtures: the tiny models, composed configs, a local Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from cpt.models.tiny import tiny_model_dir

    return tiny_model_dir("tiny")


@pytest.fixture(scope="session")
def tiny_nosys_dir() -> Path:
    from cpt.models.tiny import tiny_model_dir

    return tiny_model_dir("tiny_nosys")


# The defaults run the real built-in model (minutes); tests run the tiny random models (seconds)
# unless they name a model or a training preset themselves. Random weights almost never emit
# EOS, so the tiny runs also pair and judge generations cut at max_new_tokens.
TINY = (
    *("teacher=tiny", "judge=tiny", "student=tiny", "train=tiny", "engine=hf"),
    *("pairs.keep_truncated=true", "adherence.judge_truncated=true"),
    "evaluate.judge_truncated=true",
)


def pin_tiny(args: tuple[str, ...] | list[str]) -> list[str]:
    """`args` plus the TINY overrides whose keys `args` does not set."""
    keys = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}
    return [*args, *(o for o in TINY if o.split("=", 1)[0] not in keys)]


def compose(*overrides: str, tiny: bool = True):
    """The composed config (dataclasses) for these overrides, as jobs/launch.py sees it
    (with the tiny models pinned unless `tiny=False`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cpt.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        args = pin_tiny(overrides) if tiny else list(overrides)
        return to_config(hydra_compose(config_name="config", overrides=args))


def launch(
    *args: str, timeout: float = 600, check: bool = True, env: dict | None = None, tiny: bool = True
) -> subprocess.CompletedProcess:
    """Run jobs/launch.py in a subprocess (the real entry point) and capture its output
    (with the tiny models pinned unless `tiny=False`)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "launch.py"), *(pin_tiny(args) if tiny else args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from cpt.parallel import init_ray

    # Ray workers unpickle test-defined worker factories by module name
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    )
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def has_slurm() -> bool:
    return (
        shutil.which("sbatch") is not None
        and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    )
