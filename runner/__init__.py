"""The ablation runner: config schemas, validation, one job's life cycle, sweep callbacks."""
