"""Shared fixtures. Keep this small: per-package fixtures live in the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """Run torch on one thread: on a shared 2-core machine two threads per process oversubscribe the
    cores and tiny models get many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One sqlite tracking store for the session (creating one costs seconds), artifacts under tmp."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    MlflowClient(uri).create_experiment("fusebench-tests", artifact_location=(root / "artifacts").as_uri())
    return uri
