"""Run one LAE ablation job, or a sweep with ``-m``.

    python run_ablation.py task=digits envelope@envelopes.classification=sigmoid
    python run_ablation.py -m experiment=quick_digits

Composes and validates the config, runs the task with its envelopes, writes
the job's files (see runner/recorder.py) and returns the objective.
"""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from runner.config import register_configs
from runner.job import run_job

register_configs()


def parallel_threads(hydra_cfg) -> int | None:
    """Torch threads per job under a launcher that runs jobs side by side, so that jobs x threads <= cores.

    Oversubscribing the cores is slower than running serially. With the
    joblib launcher each job gets ``cores // n_jobs`` threads; under Slurm
    (submitit) the job's ``cpus_per_task``; under Ray its ``num_cpus``.
    ``threads=`` overrides all of these.
    """
    launcher = hydra_cfg.launcher
    if launcher.get("cpus_per_task") is not None:
        return int(launcher.cpus_per_task)
    if launcher.get("ray") is not None and launcher.ray.get("remote", {}).get("num_cpus") is not None:
        return int(launcher.ray.remote.num_cpus)
    n_jobs = launcher.get("n_jobs")
    if n_jobs is None:
        return None
    cores = os.cpu_count() or 1
    jobs = n_jobs if n_jobs > 0 else cores + 1 + n_jobs  # joblib: -1 is every core, -2 all but one
    return max(1, cores // max(1, min(jobs, cores)))


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
        default_threads=parallel_threads(hydra_cfg) if multirun else None,
    )


if __name__ == "__main__":
    main()
