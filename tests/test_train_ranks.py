"""The `train` stage as a multi-task Slurm job (one rank per task; on the CPU CI cluster
`train.gpus=2` gives 2 CPU ranks, gloo): DeepSpeed ZeRO-2 at world size 2, rank 0 writes the
adapter, manifest and `_SUCCESS`, so `evaluate` finds it.

- losses of 2 ranks x grad_accum 2 equal those of 1 rank x grad_accum 4 (the same effective
  batch: accelerate hands rank r the batches r, r+2, ... of the same seeded order),
- `scontrol requeue` mid-training: the job runs again, resumes from the last checkpoint and
  ends with the adapter of an uninterrupted 2-rank run.

The data stages run once, locally; each variant trains in its own copy of that run folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import compose, launch
from safetensors.torch import load_file
from test_slurm import SMALL, finish, ledger, popen_launch, sacct_history, slurm_test, wait_until

from cpt import store
from cpt.pipeline import stage_dir

pytestmark = pytest.mark.slow
STEPS, SAVE = 8, 2
TRAIN = [
    "deepspeed=zero2",
    f"train.max_steps={STEPS}",
    f"train.save_steps={SAVE}",
    "train.learning_rate=5e-3",
    "train.warmup_ratio=0.0",
]


def variant(ranks: int) -> list[str]:
    return [*SMALL, *TRAIN, f"train.gpus={ranks}", f"train.grad_accum={4 // ranks}"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("data")
    launch(f"run_dir={run}", "stage=pairs", *SMALL, timeout=600)
    return run


def copy_of(data_run: Path, dest: Path) -> Path:
    shutil.copytree(data_run, dest, ignore=shutil.ignore_patterns(".hydra", "*.lock"))
    return dest


def summary(run: Path, ranks: int) -> dict:
    folder = stage_dir(compose(f"run_dir={run}", *variant(ranks)), "train")
    assert store.is_done(folder), f"train not done in {folder}"
    return json.loads((folder / "train_summary.json").read_text())


def adapter(run: Path, ranks: int) -> dict[str, torch.Tensor]:
    folder = stage_dir(compose(f"run_dir={run}", *variant(ranks)), "train")
    return load_file(folder / "adapter" / "adapter_model.safetensors")


@slurm_test
def test_two_ranks_match_one_and_a_requeue_resumes_to_the_same_adapter(data_run, tmp_path):
    runs = {k: copy_of(data_run, tmp_path / k) for k in ("one", "two", "requeued")}
    drivers = {
        k: popen_launch(
            f"run_dir={runs[k]}", "cluster=ci", "stage=train", "wait=true", *variant(ranks)
        )
        for k, ranks in (("one", 1), ("two", 2), ("requeued", 2))
    }
    cfg = compose(f"run_dir={runs['requeued']}", *variant(2))
    folder = stage_dir(cfg, "train")
    ckpts = folder / "checkpoints"
    wait_until(
        lambda: any((p / "trainer_state.json").exists() for p in ckpts.glob("checkpoint-*")),
        900,
        "a first checkpoint of the requeued run",
        step=0.2,
    )
    jid = ledger(cfg, "train")["job_id"]
    assert not store.is_done(folder), "training finished before the requeue"
    subprocess.run(["scontrol", "requeue", jid], check=True)
    for k, proc in drivers.items():
        rc, out = finish(proc, 1200)
        assert rc == 0, f"{k}: {out[-4000:]}"

    one, two = summary(runs["one"], 1), summary(runs["two"], 2)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-3, abs=1e-4)

    states = [r["State"] for r in sacct_history(jid)]
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    requeued = summary(runs["requeued"], 2)
    assert requeued["resumed_from_step"] is not None and requeued["steps"] == STEPS
    straight, resumed = adapter(runs["two"], 2), adapter(runs["requeued"], 2)
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    # rank 0 alone wrote the stage's manifest; evaluate reads the adapter it names
    manifest = store.read_json(folder / store.MANIFEST)
    assert Path(manifest["adapter_dir"]) == folder / "adapter"
    assert manifest["slurm_job_id"] == jid
