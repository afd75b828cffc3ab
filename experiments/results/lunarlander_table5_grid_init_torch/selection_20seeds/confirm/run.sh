#!/usr/bin/env bash
# 360 runs
python run_ablation.py -m hydra.sweeper.jobs=experiments/results/lunarlander_table5_grid_init_torch/selection_20seeds/confirm/jobs.yaml hydra.sweep.dir=experiments/results/lunarlander_table5_grid_init_torch/selection_20seeds/confirm/sweep hydra/launcher=batched
