"""Sub-command dispatch shared by the command lines, and bench's own commands (``run``, ``perf``, ``zoo``).

The ``fusebench`` command line, which sits above every package, adds the other packages' commands to
these; ``python -m bench.cli`` offers bench's alone. A command is a module (or object) with
``configure(parser)`` and ``main(args) -> int``, imported when the parser is built: heavy imports (torch,
MLflow, Optuna) belong inside ``main``. Bad input (a ``ValueError`` subclass raised by fusebench or the
fusion library) is printed as one line ``fusebench <cmd>: error: ...`` on stderr with exit code 2 and no
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# name -> (module or object with configure/main, help)
COMMANDS: dict[str, tuple[Any, str]] = {
    "run": ("bench.experiment_cli", "run one fusion experiment from a YAML config"),
    "perf": ("bench.perf", "benchmark fusion time and peak memory of the methods"),
    "zoo": ("bench.zoo", "walk timm's models: which fuse, which are refused and why (docs/architectures.md)"),
}


def _load(target: Any) -> Any | None:
    """The command's implementation; None when its module is not installed (the others still work)."""
    if not isinstance(target, str):
        return target
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is None or not target.startswith(exc.name):
            raise
        return None


def build_parser(commands: dict[str, tuple[Any, str]] = COMMANDS) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="fusebench", description="Benchmark platform for model fusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    loaded = {}
    for name, (target, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        command = _load(target)
        if command is not None:
            command.configure(p)
            loaded[name] = command
    return parser, loaded


def _user_error_types() -> tuple[type[BaseException], ...]:
    from bench.errors import FusebenchError

    types: list[type[BaseException]] = [FusebenchError]
    fusion_mod = sys.modules.get("fusion")
    if fusion_mod is not None:
        types.append(fusion_mod.FusionError)
    return tuple(types)


def main(argv: list[str] | None = None, commands: dict[str, tuple[Any, str]] = COMMANDS) -> int:
    parser, loaded = build_parser(commands)
    args = parser.parse_args(argv)
    if args.command not in loaded:
        missing = commands[args.command][0]
        print(f"fusebench {args.command}: error: not available ({missing} is missing)", file=sys.stderr)
        return 2
    try:
        return int(loaded[args.command].main(args) or 0)
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
