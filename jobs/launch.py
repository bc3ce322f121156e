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
from cpt.config import ConfigError, register_configs, to_config
from cpt.rubric import RubricError
from cpt.store import StoreError, redact_file
from cpt.tasks import TaskError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("cpt").setLevel(logging.INFO)
    redact_hydra_files(list(cfg.get("secrets_env") or []))
    try:
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
    secrets redacted (`cpt.store.redact`) before anything else runs."""
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


if __name__ == "__main__":
    main()
