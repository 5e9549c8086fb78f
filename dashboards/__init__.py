"""Leaderboards, plots and HTML reports, read from MLflow only (design.md §3 is the contract).

Nothing here needs the machine that ran the experiments: every number comes from the tracking store,
and the Optuna study (for the optimization history) is opened read-only when its storage is reachable.
"""
