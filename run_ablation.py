"""Run one LAE ablation job, or a sweep with ``-m``.

    python run_ablation.py task=digits envelope@envelopes.classification=sigmoid
    python run_ablation.py -m experiment=quick_digits

Composes and validates the config, runs the task with its envelopes, writes
the job's files (see runner/recorder.py) and returns the objective.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config import register_configs
from runner.job import run_job

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return run_job(
        cfg,
        job_dir=Path(hydra_cfg.runtime.output_dir),
        sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
        overrides=list(hydra_cfg.overrides.task),
        reraise=not multirun,
    )


if __name__ == "__main__":
    main()
