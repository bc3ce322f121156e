"""cpt entry point (Hydra). Composes conf/config.yaml and hands it to cpt.pipeline.

python jobs/launch.py                      # whole pipeline, local, tiny models
python jobs/launch.py stage=generate       # one stage
python jobs/launch.py plan=true            # what would run, nothing runs
python jobs/launch.py --cfg job            # print the composed config
python jobs/launch.py -m student=tiny,tiny_nosys   # multirun (sweep)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from cpt import pipeline
from cpt.config import ConfigError, CptConfig, register_configs, to_config, validate
from cpt.config_keys import override_problems
from cpt.rubric import RubricError
from cpt.store import StoreError, redact_file
from cpt.tasks import TaskError

register_configs()
ARGV_PROBLEMS: list[str] = []  # unknown override keys, reported by stage=check


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cpt").setLevel(logging.INFO)
    redact_hydra_files(list(cfg.get("secrets_env") or []))
    try:
        if ARGV_PROBLEMS:  # stage=check: every problem at once, these first
            from cpt.commands.check import run_check

            config = to_config(cfg)
            run_check(config, ARGV_PROBLEMS + validate(config))
            return
        pipeline.run(to_config(cfg))
    except (
        ConfigError,
        StoreError,
        RubricError,
        TaskError,
    ) as exc:  # a clear one-line error, not a traceback wall
        sys.exit(f"cpt: error: {exc}")


def redact_hydra_files(secrets_env: list[str]) -> None:
    """Hydra has just saved the composed config, its own config and the overrides under
    `<output dir>/.hydra/` (and `multirun.yaml` in a sweep folder); rewrite them with
    secrets redacted (`cpt.redact.redact`) before anything else runs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    files = []
    if hc.output_subdir is not None:
        files += sorted((Path(hc.runtime.output_dir) / hc.output_subdir).glob("*.yaml"))
    if hc.mode == RunMode.MULTIRUN:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    for path in files:
        if path.is_file():
            redact_file(path, secrets_env)


def screen_overrides(argv: list[str]) -> list[str]:
    """Refuse unknown keys before Hydra sees them, whatever their prefix (`train.betta`,
    `+train.betta`, `++train.betta`): one line naming the closest key. With stage=check
    they are left out of the composition and reported with every other problem."""
    problems = override_problems(CptConfig, argv[1:])
    if not problems:
        return argv
    if "stage=check" not in argv[1:]:
        sys.exit(f"cpt: error: {'; '.join(p for _, p in problems)}")
    ARGV_PROBLEMS.extend(p for _, p in problems)
    bad = {a for a, _ in problems}
    return [a for a in argv if a not in bad]


if __name__ == "__main__":
    sys.argv = screen_overrides(sys.argv)
    main()
