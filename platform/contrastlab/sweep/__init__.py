"""Sweeps: search spaces, ablations, the Ray Tune runner, reports and reproduction.

``spec``       what search spaces and ablation specs share (params, resources, metrics, YAML)
``space``      search spaces: YAML -> :class:`~contrastlab.sweep.space.SearchSpace` (Optuna)
``ablation``   factors x seeds grids, their summaries (intervals, paired differences), plots
``runner``     the Ray boundary: Tuner, OptunaSearch, ASHA, resources, restore, MLflow trials
``report``     a finished sweep's best trial, importance and plots, from MLflow
``reproduce``  re-run a trial locally from its MLflow record

Importing this package imports none of them (Ray and MLflow load only where they are used).
"""
