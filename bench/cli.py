"""The ``fusebench`` command line.

Each sub-command lives in the package that owns it and exposes ``configure(parser)`` and
``main(args) -> int``; this module only dispatches, so importing it stays cheap (torch, MLflow and
Optuna are imported by the sub-command that needs them).
Bad input (a ``ValueError`` subclass raised by fusebench or the fusion library) is printed as one
line on stderr with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
COMMANDS = {
    "run": ("bench.experiment_cli", "run one fusion experiment from a YAML config"),
    "perf": ("bench.perf", "benchmark fusion time and peak memory of the methods"),
    "zoo": ("bench.zoo", "walk timm's models: which fuse, which are refused and why (docs/architectures.md)"),
    "sweep": ("sweeps.cli", "run an Optuna sweep from a YAML spec"),
    "leaderboard": ("dashboards.cli_leaderboard", "export a leaderboard table from MLflow"),
    "report": ("dashboards.cli_report", "write a self-contained HTML report from MLflow"),
    "ui": ("dashboards.cli_ui", "start the MLflow UI on the configured tracking store"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="fusebench", description="Benchmark platform for model fusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A sub-command whose module is not installed/built must not break the other ones.
            if exc.name is None or not module_name.startswith(exc.name):
                raise
            continue
        module.configure(p)
        modules[name] = module
    return parser, modules


def _user_error_types() -> tuple[type[BaseException], ...]:
    from bench.errors import FusebenchError

    types: list[type[BaseException]] = [FusebenchError]
    fusion_mod = sys.modules.get("fusion")
    if fusion_mod is not None:
        types.append(fusion_mod.FusionError)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command not in modules:
        print(
            f"fusebench {args.command}: error: not available ({COMMANDS[args.command][0]} is missing)",
            file=sys.stderr,
        )
        return 2
    try:
        return int(modules[args.command].main(args) or 0)
    except KeyboardInterrupt:
        print("fusebench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only user errors are turned into a one-line message
        if isinstance(exc, _user_error_types()):
            print(f"fusebench {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
