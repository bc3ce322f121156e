"""GPU discovery without torch (`cpt.gpus`): what the driver lists, limited by
CUDA_VISIBLE_DEVICES. This machine has no GPU, so `nvidia-smi` is a stand-in script on PATH
that prints what the real one prints for `--query-gpu=name --format=csv,noheader`."""

from __future__ import annotations

import pytest

from cpt import gpus


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """Install an `nvidia-smi` listing the given GPU names (None: no driver at all)."""

    def install(names: list[str] | None, rc: int = 0) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        if names is not None:
            script = bin_dir / "nvidia-smi"
            body = "".join(f"echo '{n}'\n" for n in names)
            script.write_text(f"#!/bin/sh\n{body}exit {rc}\n")
            script.chmod(0o755)
        monkeypatch.setenv("PATH", str(bin_dir))
        gpus.driver_gpu_names.cache_clear()

    yield install
    gpus.driver_gpu_names.cache_clear()


def test_no_driver_means_no_gpu(driver, monkeypatch):
    driver(None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.machine_gpus() == 0
    assert gpus.gpu_name() is None


def test_every_listed_gpu_counts_when_nothing_hides_them(driver, monkeypatch):
    driver(["NVIDIA H200", "NVIDIA H200"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.machine_gpus() == 2
    assert gpus.gpu_name() == "NVIDIA H200"


@pytest.mark.parametrize(
    ("visible", "count", "name"),
    [
        ("", 0, None),  # hidden: the CPU recipe, no GPU in Ray
        ("-1", 0, None),
        ("1", 1, "NVIDIA A100-SXM4-80GB"),  # the name of the GPU it sees, not of GPU 0
        ("0,1,2,3", 2, "NVIDIA H100 80GB HBM3"),  # never more than the driver has
        ("1,-1,0", 1, "NVIDIA A100-SXM4-80GB"),  # CUDA stops at the first invalid id
    ],
)
def test_cuda_visible_devices_limits_what_is_seen(driver, monkeypatch, visible, count, name):
    driver(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpus.machine_gpus() == count
    assert gpus.gpu_name() == name


def test_a_failing_driver_means_no_gpu(driver, monkeypatch):
    driver(["NVIDIA-SMI has failed because it couldn't communicate with the driver"], rc=9)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpus.machine_gpus() == 0
