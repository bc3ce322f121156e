"""The shared reference log-prob table (`cpt.reftable`) on the tiny random Llama, CPU, real
TRL + PEFT: built once and reused across a beta sweep, the same losses as the live reference
forward, a new key when the tokens change, corrupt tables rebuilt, one builder under contention.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cpt import reftable, store
from cpt.config import ModelConfig, TrainConfig
from cpt.fitting import rows_fingerprint
from cpt.models.flip import flip_rows
from cpt.models.tiny import tiny_model_dir
from cpt.reftable import load_table
from cpt.train import _setup, _StepTimer, _trainer, train_dpo

REPO = Path(__file__).resolve().parents[1]
TOPICS = "lighthouse garden teapot bicycle river library violin harbor".split()  # noqa: SIM905
ROWS = flip_rows(TOPICS[:6])
HELD_OUT = flip_rows(TOPICS[6:], prefix="h")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed thread count: reproducible float reductions
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    tiny_model_dir("tiny")
    return ModelConfig(name="tiny", path="builtin:tiny", system_role=True)


def config(**kw) -> TrainConfig:
    base = dict(
        max_steps=4,
        learning_rate=5e-3,
        per_device_batch_size=2,
        grad_accum=1,
        warmup_ratio=0.0,
        save_steps=4,
        seed=0,
        ref_table="true",  # 4 steps of 2 read 8 of 12 rows: `auto` would not build (below)
    )
    return TrainConfig(**{**base, **kw})


def _built_key(tiny, tmp_path, cfg: TrainConfig, rows=ROWS) -> dict:
    """Build the trainer (and so the table) without training; the table's use record."""
    out = tmp_path / "out" / store.content_hash([cfg, rows_fingerprint(rows)])
    run = _setup(cfg, tiny, rows, out, None, None, True)
    run.ref_tables = tmp_path / "reflogps"
    _trainer(run, _StepTimer(), None)
    return run.ref_table


def test_table_is_built_once_and_reused_with_the_same_losses(tiny, tmp_path, monkeypatch):
    from trl.trainer import dpo_trainer

    ref_forwards = []  # the adapter-disabled reference forward of TRL's training step
    real = dpo_trainer.use_adapter
    monkeypatch.setattr(
        dpo_trainer, "use_adapter", lambda *a, **k: ref_forwards.append(1) or real(*a, **k)
    )
    tables = tmp_path / "reflogps"
    live = train_dpo(config(), tiny, ROWS, tmp_path / "live", eval_rows=HELD_OUT, use_cpu=True)
    live_forwards, ref_forwards[:] = len(ref_forwards), []
    first = train_dpo(
        config(), tiny, ROWS, tmp_path / "b1", eval_rows=HELD_OUT, use_cpu=True, ref_tables=tables
    )
    build_forwards, ref_forwards[:] = len(ref_forwards), []
    second = train_dpo(
        config(beta=0.3), tiny, ROWS, tmp_path / "b3", eval_rows=HELD_OUT, use_cpu=True,
        ref_tables=tables,
    )  # fmt: skip

    assert live.ref_table is None and live_forwards >= 4  # one per step and evaluation batch
    assert first.ref_table["status"] == "computed"
    assert second.ref_table["status"] == "reused"
    assert second.ref_table["path"] == first.ref_table["path"]
    assert second.ref_table["key"] == first.ref_table["key"]
    assert first.ref_table["path"].startswith(str(tables / "tiny-"))
    assert first.ref_table["check"]["rows"] == 2 and first.ref_table["check"]["max_abs_diff"] < 1e-3
    # the build's batches (12 + 4 rows) and nothing else: neither run's training or
    # evaluation ran a reference forward
    per = reftable.BATCH_ROWS
    assert build_forwards == math.ceil(12 / per) + math.ceil(4 / per) and ref_forwards == []
    summary = json.loads((tmp_path / "b3" / "train_summary.json").read_text())
    assert summary["ref_table"] == second.ref_table
    # the table covers train and held-out rows; every step's loss is the live run's
    assert first.ref_table["rows"] == ROWS.num_rows + HELD_OUT.num_rows
    torch.testing.assert_close(first.losses, live.losses, rtol=0, atol=1e-4)
    a, b = (pq.read_table(r.metrics_path).to_pydict() for r in (live, first))
    torch.testing.assert_close(b["rewards/margins"], a["rewards/margins"], rtol=0, atol=1e-4)
    eval_a, eval_b = (
        json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("live", "b1")
    )
    assert eval_b["eval"]["eval_loss"] == pytest.approx(eval_a["eval"]["eval_loss"], abs=1e-4)
    assert second.losses[0] == pytest.approx(live.losses[0], abs=1e-4)  # ln 2: policy == reference
    assert second.losses[1] != pytest.approx(first.losses[1], abs=1e-4)  # beta did change training


def test_auto_builds_only_when_the_run_reads_every_row_but_reuses_any(tiny, tmp_path):
    """`train.ref_table=auto` (the default): 4 steps of 2 rows read 8 of the 12 training rows,
    so a table (12 + 4 forwards) would cost more than the live reference (8 + 4): not built,
    and the manifest says why. A run of one epoch builds it; then the short run reads it."""
    short = _built_key(tiny, tmp_path, config(ref_table="auto"))
    assert short["status"] == "live" and "reads 8 of 12 training rows" in short["why"]
    assert not (tmp_path / "reflogps").exists() or not list((tmp_path / "reflogps").iterdir())
    epoch = _built_key(tiny, tmp_path, config(ref_table="auto", max_steps=-1, epochs=1.0))
    assert epoch["status"] == "computed" and epoch["key"] == short["key"]
    again = _built_key(tiny, tmp_path, config(ref_table="auto"))
    assert again["status"] == "reused" and again["path"] == epoch["path"]


@pytest.mark.parametrize("value", [True, "True", "auto", False, "false"])
def test_ref_table_accepts_what_hydra_passes(value):
    assert TrainConfig(ref_table=value).ref_table == str(value).lower()


def test_ref_table_names_its_choices():
    from cpt.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.ref_table must be one of auto, true, false"):
        TrainConfig(ref_table="sometimes")


def test_key_follows_the_tokens_not_the_recipe(tiny, tmp_path):
    key = _built_key(tiny, tmp_path / "a", config())["key"]
    assert (
        _built_key(tiny, tmp_path / "a", config(beta=0.5, learning_rate=1e-3, seed=3))["key"] == key
    )
    shorter = config(max_length=100, max_prompt_length=80)  # cuts ornate answers (114 tokens)
    assert _built_key(tiny, tmp_path / "a", shorter)["key"] != key
    fewer = ROWS.slice(0, ROWS.num_rows - 2)
    assert _built_key(tiny, tmp_path / "a", config(), rows=fewer)["key"] != key
    other_pairs = flip_rows([*TOPICS[:5], "kettle"])
    assert _built_key(tiny, tmp_path / "a", config(), rows=other_pairs)["key"] != key


@pytest.mark.parametrize("damage", ["truncated", "no_success", "other_rows"])
def test_a_damaged_table_is_rebuilt_not_used(tiny, tmp_path, damage):
    built = _built_key(tiny, tmp_path, config())
    folder = tmp_path / "reflogps" / built["path"].rsplit("/", 1)[-1]
    shard = store.shard_path(folder, 0)
    ids = set(pq.read_table(shard)["id"].to_pylist())
    if damage == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "no_success":  # a build killed before its done marker
        (folder / store.DONE_MARKER).unlink()
    else:  # intact file, checksum rewritten, but a row missing: not this table
        table = pq.read_table(shard)
        store.write_shard(folder, 0, table.slice(1), {})
        manifest = store.read_json(folder / store.MANIFEST)
        store.atomic_write_json(folder / store.MANIFEST, {**manifest, "rows": table.num_rows - 1})
    assert load_table(folder, built["key"], ids) is None
    again = _built_key(tiny, tmp_path, config())
    assert again["status"] == "computed" and again["path"] == built["path"]
    assert load_table(folder, built["key"], ids) is not None


def test_a_table_disagreeing_with_the_hf_forward_is_not_written(tiny, tmp_path, monkeypatch):
    real = reftable._forward

    def off_by_one(trainer, dataset, batch):
        chosen, rejected = real(trainer, dataset, batch)
        return [c + 1.0 for c in chosen], rejected

    monkeypatch.setattr(reftable, "_forward", off_by_one)
    with pytest.raises(store.StoreError, match="plain HF forward"):
        _built_key(tiny, tmp_path, config())
    assert not list((tmp_path / "reflogps").glob(f"*/{store.DONE_MARKER}"))


BUILDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import pyarrow as pa
    from cpt.reftable import obtain

    folder, log = Path(sys.argv[1]), Path(sys.argv[2])
    Path(sys.argv[3]).touch()  # started
    while not Path(sys.argv[4]).exists():  # both start together
        time.sleep(0.01)

    def compute():
        with open(log, "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # long enough for the other process to find the lock held
        table = pa.table({"id": ["r1"], "ref_chosen_logps": [-1.5], "ref_rejected_logps": [-2.5]})
        return table, {}

    table, use = obtain(folder, "k" * 32, compute, expect={"r1"})
    print(json.dumps({"status": use.status, "value": table["ref_chosen_logps"][0].as_py()}))
    """
)


def test_two_processes_build_the_table_exactly_once(tmp_path):
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                BUILDER,
                str(tmp_path / "t"),
                str(tmp_path / "log"),
                str(tmp_path / f"started{i}"),
                str(go),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(2)
    ]
    while not all((tmp_path / f"started{i}").exists() for i in range(2)):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert (tmp_path / "log").read_text() == "built\n"
    assert sorted(o["status"] for o in outs) == ["computed", "reused"]
    assert all(o["value"] == -1.5 for o in outs)
