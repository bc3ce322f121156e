"""The whole pipeline on the built-in real instruct model (SmolLM2-135M-Instruct).

A real tokenizer and chat template (with its injected-system-prompt quirk), real English, real
JSON from a real judge, LoRA DPO on a real architecture. Cut to one rubric, three tasks and
short answers so it stays a few minutes on 2 CPU cores; the HF engine in-process (no Ray,
no vLLM start-up per stage: the vLLM path is covered by test_engine_vllm and bench_engines).
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import compose, launch

from cpt import store
from cpt.pipeline import stage_dir

pytestmark = pytest.mark.slow

REAL = [
    *("engine=hf", "parallel.backend=inline", "tasks.num_tasks=3", "tasks.test_fraction=0.34"),
    *("rubrics.include=[concision]", "teacher.sampling.max_new_tokens=48"),
    *("student.sampling.max_new_tokens=48", "sysprompts.paraphrases=1", "train.max_steps=1"),
    *("adherence.max_attempts=1", "evaluate.samples=1", "evaluate.judge_max_attempts=1"),
    *("evaluate.agreement_fraction=0", "report.n_boot=50", "pairs.keep_truncated=true"),
]


def readable(text: str) -> bool:
    words = re.findall(r"\S+", text)
    return (
        len(words) >= 3 and sum(w.strip(".,;:!?'\"()").isalpha() for w in words) >= len(words) / 2
    )


@pytest.mark.timeout(2400)  # a few minutes on 2 idle cores; headroom for a busy CI box
def test_real_model_pipeline_end_to_end(tmp_path):
    launch(f"run_dir={tmp_path}", *REAL, tiny=False, timeout=1800)
    cfg = compose(f"run_dir={tmp_path}", *REAL, tiny=False)
    assert cfg.student.path == "builtin:smollm2-135m"
    gens = store.read_table(stage_dir(cfg, "generate")).to_pylist()
    assert len(gens) == 3 * 4 and all(g["ok"] for g in gens)  # 3 levels + the no-rubric baseline
    assert sum(readable(g["text"]) for g in gens) >= len(gens) * 3 // 4, [g["text"] for g in gens]
    baseline = [json.loads(g["messages"]) for g in gens if g["kind"] == "no_rubric"]
    assert all(m[0]["role"] == "user" for m in baseline)  # no system turn asked for...
    adherence = store.read_table(stage_dir(cfg, "adherence")).to_pylist()
    parsed = [a for a in adherence if a["ok"]]
    assert parsed and all(0 <= a["score"] <= 100 for a in parsed)  # real JSON from a real judge
    report = (tmp_path / "report" / "report.md").read_text()
    assert "smollm2_135m" in report and "Truncated responses" in report
