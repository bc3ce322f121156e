"""cpt.train under DeepSpeed: two real CPU processes (gloo), launched the way torchrun/srun do,
through the command line `python -m cpt.train`.

ZeRO-2 and ZeRO-3 must give the same adapter, saved via PEFT from the unwrapped model (no
DeepSpeed-wrapped names) and loadable on the base; a ZeRO-2 run SIGKILLed after a checkpoint and
re-launched must end where the uninterrupted run ends. Each launch costs ~30-60 s (imports, the
gloo rendezvous, DeepSpeed's engine set-up), hence `slow`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from cpt.models.tiny import tiny_model_dir

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TRAIN_ROWS  # the same controlled rows

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_STEPS = 12, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rows: Path, out: Path, ds_config: str, world: int = 2) -> list[subprocess.Popen]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "cpt.train",
            "--rows",
            str(rows),
            "--student-path",
            "builtin:tiny",
            "--out",
            str(out),
            "--deepspeed",
            ds_config,
            "--max-steps",
            str(STEPS),
            "--save-steps",
            str(SAVE_STEPS),
            "--grad-accum",
            "2",
            "--learning-rate",
            "5e-3",
            "--warmup-ratio",
            "0.0",
            "--cpu",
        ]
        log = open(out.parent / f"{out.name}-rank{rank}.log", "ab")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"DeepSpeed run {out} timed out; logs: {out.parent}/{out.name}-rank*.log")
    codes = [p.returncode for p in procs]
    if any(codes):
        tail = (out.parent / f"{out.name}-rank0.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"DeepSpeed run {out} failed with exit codes {codes}:\n{tail}")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    tiny_model_dir("tiny")  # build once, before two processes race for the lock
    path = tmp_path_factory.mktemp("rows") / "pairs.parquet"
    pq.write_table(TRAIN_ROWS, path)
    return path


@pytest.fixture(scope="module")
def zero2_run(rows, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "train"
    _wait(_launch(rows, out, "conf/deepspeed/zero2.json"), out)
    return out


def _check_adapter(out: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = out / "adapter"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors, "empty adapter"
    for name in tensors:  # PEFT names from the unwrapped model, nothing from DeepSpeed/DDP
        assert name.startswith("base_model.model.model.layers."), name
        assert "lora_A" in name or "lora_B" in name, name
        assert not any(w in name for w in ("module.", "_orig_mod", "ds_", "_fsdp")), name
    assert all(t.numel() > 0 for t in tensors.values()), "a ZeRO-3 shard was saved, not the whole"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir("tiny")), adapter
    )
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(tensors)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    return tensors


def test_zero2_two_processes(zero2_run):
    tensors = _check_adapter(zero2_run)
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k)
    losses = json.loads((zero2_run / "train_summary.json").read_text())["losses"]
    assert losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert len(losses) == STEPS
    assert {p.name for p in (zero2_run / "checkpoints").glob("checkpoint-*")} == {
        f"checkpoint-{STEPS - SAVE_STEPS}",
        f"checkpoint-{STEPS}",
    }


def test_zero2_sigkill_and_relaunch_matches_uninterrupted(rows, zero2_run, tmp_path):
    out = tmp_path / "train"
    procs = _launch(rows, out, "conf/deepspeed/zero2.json")
    marker = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
    deadline = time.monotonic() + 400
    while not marker.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:  # the whole process group: what a preemption does
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert marker.exists(), "no checkpoint appeared before the processes ended"
    assert not (out / "adapter").exists(), "the run finished before it could be killed"

    _wait(_launch(rows, out, "conf/deepspeed/zero2.json"), out)
    summary = json.loads((out / "train_summary.json").read_text())
    straight = json.loads((zero2_run / "train_summary.json").read_text())
    assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] >= SAVE_STEPS
    torch.testing.assert_close(summary["losses"], straight["losses"], rtol=1e-5, atol=1e-5)
    a, b = _check_adapter(zero2_run), _check_adapter(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=k)


def test_zero3_two_processes_matches_zero2(rows, zero2_run, tmp_path):
    out = tmp_path / "train"
    _wait(_launch(rows, out, "conf/deepspeed/zero3.json"), out)
    a, b = _check_adapter(zero2_run), _check_adapter(out)
    assert a.keys() == b.keys()
    # Same data and steps: sharding must not change the result beyond summation order (ZeRO-3
    # reduce-scatters where ZeRO-2 all-reduces; Adam magnifies that on near-zero gradients, seen
    # up to ~3e-5 after 12 steps at lr 5e-3), so a looser tolerance than resume's 1e-5.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-4, msg=k)
    losses = [
        json.loads((d / "train_summary.json").read_text())["losses"] for d in (zero2_run, out)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
