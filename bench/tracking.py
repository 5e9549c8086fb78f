"""MLflow logging of one experiment run, with explicit run ids (no fluent "active run").

Why the client API: sweeps run experiments in worker processes under a parent run; the fluent API's
process-global active run would attach metrics to the wrong run. Metrics are buffered and written with
``log_batch`` (one request per flush) so tracking stays a small fraction of a small experiment; the time
spent here is accounted in ``Tracker.seconds``. Writes after the run is created go through one
background thread, in order, so they overlap with training; ``end`` waits for them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

from bench import schema
from bench.config import flatten, to_yaml

_BATCH_PARAMS, _BATCH_METRICS, _BATCH_TAGS = 100, 1000, 100
_VERSION_PACKAGES = ("fusebench", "torch", "torchvision", "timm", "torch-pruning", "pot", "mlflow", "numpy")


def resolve_tracking_uri(*candidates: str | None) -> str:
    """The one precedence for every command: the first candidate that is set (a ``--tracking-uri``, then
    the config's ``tracking_uri``), else ``MLFLOW_TRACKING_URI``, else MLflow's own default
    (``sqlite:///mlflow.db`` in the working directory)."""
    for uri in candidates:
        if uri:
            return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    import mlflow

    return mlflow.get_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if not path or path == ":memory:":
        return None
    return Path(unquote(path.split("?", 1)[0]))


def open_client(*candidates: str | None, must_exist: bool = False):
    """``(MlflowClient, uri)`` on the store ``resolve_tracking_uri(*candidates)`` names. ``must_exist``
    (readers): refuse a store that is not there instead of creating an empty one for a mistyped path."""
    from mlflow import MlflowClient

    from bench.errors import FusebenchError

    uri = resolve_tracking_uri(*candidates)
    if must_exist:
        db = sqlite_path(uri)
        if db is not None and not db.exists():
            raise FusebenchError(f"tracking store {uri!r} does not exist (no file {db})")
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            local = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
            if not local.exists():
                raise FusebenchError(f"tracking store {uri!r} does not exist")
    return MlflowClient(tracking_uri=uri), uri


def tag_filter(**tags: str | int) -> str:
    """An MLflow search filter matching every ``tag=value`` (``tag_filter(**{schema.ROLE: "study"})``)."""
    parts = []
    for tag, value in tags.items():
        quoted = str(value).replace("'", "\\'")
        parts.append(f"tags.`{tag}` = '{quoted}'")
    return " AND ".join(parts)


def search_runs(client, experiment_ids: list[str], filter_string: str = "", page_size: int = 1000):
    """Every run matching the filter, page by page (``search_runs`` returns one page at a time)."""
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=page_size, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the fusebench source tree ("" when not in a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    out = {}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg.replace("-", "_")] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance_tags() -> dict[str, str]:
    tags = {f"{schema.VERSION_PREFIX}{k}": v for k, v in library_versions().items()}
    tags[schema.GIT_COMMIT] = git_commit()
    return tags


def experiment_id(client, name: str) -> str:
    """Get or create the experiment ``name`` (tagged so MLflow's UI opens it on its runs)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags=schema.EXPERIMENT_KIND)
        except MlflowException:  # created meanwhile by another worker
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if any(exp.tags.get(key) is None for key in schema.EXPERIMENT_KIND):
        for key, value in schema.EXPERIMENT_KIND.items():
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """One MLflow run: params, tags, buffered metrics, the config artifact, the final status."""

    def __init__(
        self,
        cfg: dict,
        *,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, object] | None = None,
        flush_every_s: float = 5.0,
    ):
        start = time.perf_counter()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg.get("tracking_uri")))
        self.experiment_id = experiment_id(self.client, cfg["experiment"])
        tags = {
            schema.ROLE: schema.ROLE_EXPERIMENT,
            **{k: "" if v is None else str(v) for k, v in (tags or {}).items()},
        }
        if parent_run_id:
            tags[schema.MLFLOW_PARENT_RUN] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.run_id: str = run.info.run_id
        self._metrics: list = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusebench-tracking")
        self._pending: list = []
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self.seconds = time.perf_counter() - start

    def log_dataset(self, data, dcfg: dict) -> None:
        """The data set as MLflow dataset inputs (the UI's Dataset column): one per split, with its size."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        splits = {"train": data.train, "val": data.val, "test": data.test}
        sizes = {k: len(v) for k, v in splits.items()}
        source = json.dumps(
            {k: dcfg.get(k) for k in ("name", "root", "image_size", "val_fraction")}, default=str
        )
        inputs = []
        for split, part in splits.items():
            h = hashlib.sha256(f"{data.name}|{split}|{sizes}|{source}".encode())
            x = getattr(part, "x", None)
            if x is not None:  # device-resident tensors: hash (a bounded prefix of) the values themselves
                h.update(x.detach().reshape(-1)[: 1 << 18].cpu().numpy().tobytes())
            profile = {
                "split": split,
                "num_rows": sizes[split],
                "num_classes": data.num_classes,
                "splits": sizes,
            }
            ds = Dataset(data.name, h.hexdigest()[:16], "fusebench", source, profile=json.dumps(profile))
            inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", split)]))
        self._timed(self.client.log_inputs, self.run_id, datasets=inputs)

    def log_model(self, model, example) -> None:
        """The fused model with MLflow's model logging (``fusion.log_model: true``): waits for the queue."""
        import mlflow

        start = time.perf_counter()
        try:
            for exc in self._drain():
                raise exc
            mlflow.set_tracking_uri(self.client.tracking_uri)
            with mlflow.start_run(run_id=self.run_id, nested=True):
                # pickled module (not a torch.export program, which fixes the batch size of the example)
                mlflow.pytorch.log_model(
                    copy.deepcopy(model).cpu(),  # the experiment's model stays on its device
                    name="fused_model",
                    input_example=example.cpu().numpy(),
                    serialization_format="pickle",
                )
        finally:
            self.seconds += time.perf_counter() - start

    def _timed(self, fn, *args, **kwargs):
        """Queue a write on the tracker's one background thread (writes stay in order); the caller
        only pays for the enqueue. ``end`` waits for them: that wait is counted in ``seconds``."""
        start = time.perf_counter()
        try:
            self._pending.append(self._pool.submit(fn, *args, **kwargs))
        finally:
            self.seconds += time.perf_counter() - start

    def _drain(self) -> list[BaseException]:
        errors = []
        for fut in self._pending:
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
        self._pending = []
        return errors

    def log_config(self, cfg: dict) -> None:
        """The resolved config: flattened as params (write-once) and as ``config.yaml``."""
        from mlflow.entities import Param

        def write():
            params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
            for chunk in _chunks(params, _BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=chunk)
            self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

        self._timed(write)

    def set_tags(self, tags: dict[str, object]) -> None:
        from mlflow.entities import RunTag

        def write():
            items = [RunTag(k, "" if v is None else str(v)[:5000]) for k, v in tags.items()]
            for chunk in _chunks(items, _BATCH_TAGS):
                self.client.log_batch(self.run_id, tags=chunk)

        self._timed(write)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        """Buffer metrics; written by ``flush``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), now, step) for k, v in values.items())

    def maybe_flush(self) -> None:
        """Flush if the last flush is older than ``flush_every_s``: live curves at a bounded cost."""
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._metrics:
            return
        pending, self._metrics = self._metrics, []

        def write():
            for chunk in _chunks(pending, _BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=chunk)

        self._timed(write)

    def end(self, status: str, error: str | None = None) -> None:
        """Flush what is buffered and terminate the run (FINISHED, FAILED or KILLED)."""
        start = time.perf_counter()
        errors: list[BaseException] = []
        try:
            self.flush()
            if error is not None:
                self.set_tags({schema.ERROR: error})
            errors = self._drain()
            if not (errors and status == "FINISHED"):
                errors = []  # a failing run re-raises its own error; tracking errors are secondary
            else:  # a write that failed must not go unnoticed
                status = "FAILED"
                self.client.set_tag(self.run_id, schema.ERROR, f"tracking: {errors[0]}"[:5000])
            self.client.set_terminated(self.run_id, status)
        finally:
            self._pool.shutdown(wait=True)
            self.seconds += time.perf_counter() - start
        if errors:
            raise errors[0]
