"""Stage jobs sized from what each stage runs (no Slurm needed: plan=true and sbatch text).

On the 8-GPU example profile with a tensor-parallel-2 32B teacher and judge and a 4B student:
generation and judging ask for replicas x 2 GPUs (no more replicas than shards), training
for `train.gpus`, CPU stages for none, and `sysprompts` (one shard) for 2 GPUs for one hour,
not 8 GPUs for 24 hours. Before this, every GPU stage asked for 8 GPUs x 1440 min: 960
GPU-hours for this plan.
"""

from __future__ import annotations

import re

import pytest
from conftest import compose, launch

from cpt import graph

H100_32B = [
    "cluster=example_h100",
    "engine=vllm",
    "teacher=qwen3_32b",
    "judge=qwen3_32b",
    "student=qwen3_4b",
]


def plan_rows(out: str) -> dict[str, str]:
    return {
        line.split()[0]: line
        for line in out.splitlines()
        if re.match(r"^[a-z]+ +(submit|done|running|reuse)", line)
    }


def test_plan_for_the_example_profile_sizes_each_stage(tmp_path):
    out = launch(f"run_dir={tmp_path}", "plan=true", *H100_32B, timeout=300).stdout
    rows = plan_rows(out)
    gpus = {s: int(re.search(r"(\d+) GPU", line).group(1)) for s, line in rows.items()}
    assert gpus == {
        "tasks": 0,
        "generate": 4,  # 2 shards at most -> 2 replicas x TP 2
        "sysprompts": 2,  # 1 shard -> 1 replica x TP 2
        "adherence": 4,
        "pairs": 0,
        "train": 1,  # train.gpus
        "evaluate": 8,  # the judge: 4 replicas x TP 2 (the profile's 8 GPUs)
        "report": 0,
    }, out
    minutes = {s: int(re.search(r"(\d+) min", line).group(1)) for s, line in rows.items()}
    assert minutes["sysprompts"] == 60 and minutes["generate"] == 1440, out
    expected = sum(gpus[s] * minutes[s] / 60 for s in rows)
    last = out.strip().splitlines()[-1]
    assert "GPU-hours" in last and float(re.findall(r"[\d.]+", last)[-1]) == pytest.approx(expected)
    assert expected < 960 / 2  # before: 8 GPUs x 24 h for every GPU stage


def test_replicas_shards_and_nodes_bound_a_stage_job(tmp_path):
    base = [f"run_dir={tmp_path}", *H100_32B]
    cfg = compose(*base, "engine.replicas=1")
    assert graph.stage_size(cfg, ("teacher",), {"shards<=": 9}, False) == graph.Size(1, 2, 1)
    cfg = compose(*base, "cluster.nodes=3")  # replicas=0: as many as 3 nodes x 8 GPUs allow
    assert graph.stage_size(cfg, ("judge",), {}, True) == graph.Size(3, 8, 1)
    assert graph.stage_size(cfg, ("judge",), {"shards": 5}, True) == graph.Size(2, 8, 1)
    assert graph.stage_size(cfg, ("judge",), {}, False) == graph.Size(1, 8, 1)
    cfg = compose(*base, "judge.engine=openai", "judge.base_url=http://x:8000/v1")
    assert graph.stage_size(cfg, ("judge",), {}, False) == graph.Size()  # a server elsewhere
    cfg = compose(*base, "train.gpus=4", "train.nodes=2")
    assert graph.stage_size(cfg, (graph.TRAIN,), {}, False) == graph.Size(2, 4, 4)
    ci = compose(f"run_dir={tmp_path}", "cluster=ci", "train.gpus=2")  # CPU ranks on a CPU site
    assert graph.stage_size(ci, (graph.TRAIN,), {}, False) == graph.Size(1, 0, 2)


def test_a_model_larger_than_a_node_is_refused_at_launch(tmp_path):
    proc = launch(
        f"run_dir={tmp_path}", "plan=true", *H100_32B, "teacher.gpus=16", check=False, timeout=300
    )
    assert proc.returncode != 0
    assert "teacher.gpus=16 but cluster example_h100 has 8 GPUs per node" in proc.stderr
