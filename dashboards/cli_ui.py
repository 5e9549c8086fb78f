"""``fusebench ui``: start the MLflow UI on the configured tracking store, on 127.0.0.1 by default.

The UI shows every param, metric and artifact (including the leaderboards and reports logged to a
study's parent run), so binding it beyond the loopback interface is an explicit choice that is warned
about: MLflow's UI has no authentication unless it is set up.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from bench.tracking import resolve_tracking_uri
from dashboards._cli import add_tracking_arg
from dashboards.data import warn_stderr


def configure(parser: argparse.ArgumentParser) -> None:
    add_tracking_arg(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=5000, help="default: 5000")
    parser.add_argument(
        "--allowed-hosts",
        metavar="HOSTS",
        help="passed to mlflow ui: Host headers to accept besides localhost",
    )
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default: 1)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the mlflow command and URL, start nothing"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_command(
    uri: str, host: str, port: int, workers: int = 1, allowed_hosts: str | None = None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return command


def main(args: argparse.Namespace) -> int:
    from bench.errors import FusebenchError

    if not 0 < args.port < 65536:
        raise FusebenchError(f"--port {args.port} is not a TCP port")
    uri = resolve_tracking_uri(args.tracking_uri)
    if not is_loopback(args.host):
        warn_stderr(
            f"binding the MLflow UI to {args.host}: anyone who can reach this machine can read (and change) "
            "the tracking store; MLflow's UI has no authentication by default"
        )
        if not args.allowed_hosts:
            warn_stderr(
                "MLflow only answers Host headers of localhost unless --allowed-hosts names the others"
            )
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    command = ui_command(uri, args.host, args.port, args.workers, args.allowed_hosts)
    print(f"MLflow UI for {uri}: http://{shown_host}:{args.port}", flush=True)
    # MLflow 3 opens experiments on its GenAI pages unless the "Model training" view is chosen
    print(
        f"runs tables: http://{shown_host}:{args.port}/#/experiments?workflowType=machine_learning",
        flush=True,
    )
    if args.dry_run:
        print(" ".join(command))
        return 0
    # become the server: Ctrl-C and SIGTERM then reach MLflow directly and leave no orphan behind
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return
