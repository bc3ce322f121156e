"""Unknown config keys are refused whatever their prefix, in one line naming the closest key;
`stage=check` lists them with every other problem.

    pytest tests/test_config_keys.py -q
"""

from __future__ import annotations

import re

import pytest
from conftest import compose, launch

from cpt.config import ConfigError, CptConfig
from cpt.config_keys import override_key, override_problems


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_every_prefix_is_screened(prefix):
    ((arg, problem),) = override_problems(CptConfig, [f"{prefix}train.betta=0.1", "train.beta=0.2"])
    assert arg == f"{prefix}train.betta=0.1"
    assert problem == "train.betta: unknown config key (did you mean train.beta?)"


def test_valid_overrides_pass():
    ok = [
        "teacher=tiny", "hydra/launcher=slurm", "hydra.run.dir=x", "-m", "--cfg", "job",
        "cluster.additional_parameters.reservation=r1", "+cluster.additional_parameters.x=1",
        "tasks.sources=[{kind: shipped}]", "judge.sampling.max_new_tokens=8", "~engine.kind",
        "student@judge=tiny",
    ]  # fmt: skip
    assert override_problems(CptConfig, ok) == []
    assert override_key("~engine.kind") == "engine.kind" and override_key("-m") is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("+train.betta=0.1", "train.betta: unknown config key (did you mean train.beta?)"),
        ("++engine.batchsize=4", "engine.batchsize: unknown config key (did you mean engine.batch_size?)"),
        ("+judge.sampling.temprature=0", "did you mean judge.sampling.temperature?"),
    ],
)  # fmt: skip
def test_composed_config_refuses_added_keys(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(override)


def test_launch_refuses_in_one_line_and_check_reports_them(tmp_path):
    for arg in ("train.betta=0.1", "+train.betta=0.1", "++train.betta=0.1"):
        proc = launch(f"run_dir={tmp_path}", arg, "plan=true", check=False, timeout=300)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [
            "cpt: error: train.betta: unknown config key (did you mean train.beta?)"
        ]
    proc = launch(f"run_dir={tmp_path}", "+train.betta=0.1", "stage=check", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "problem: train.betta: unknown config key (did you mean train.beta?)" in proc.stdout
    assert "check: 1 problem(s)" in proc.stdout
