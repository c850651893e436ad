"""``covspec tune``: Optuna through Ray Tune over covspec's config keys, tracked in MLflow (docs/tune.md).

- :mod:`tune.space`: search spaces over dotted config keys, validated against the config schema before any trial.
- :mod:`tune.objective`: one trial: covspec against target_only on val samples, in-process, reporting per chunk.
- :mod:`tune.search`: the driver: Tuner (OptunaSearch + ASHA), resume, MLflow parent and child runs.
- :mod:`tune.report`: the trials table, the Pareto front, its plot and ``best.yaml``.
- :mod:`tune.commands`: the ``covspec tune`` subcommand.
"""
