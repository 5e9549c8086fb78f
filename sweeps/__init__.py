"""Optuna sweeps over fusion experiments: YAML specs, studies that survive crashes, parallel workers.

The package only orchestrates: every trial is one or more ``bench.experiment.run_experiment`` calls, and
everything a trial measures lives in MLflow (docs/design.md §3); Optuna keeps the search state.
"""
