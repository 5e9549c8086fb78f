"""Declarative validation of YAML mappings (experiment configs, sweep specs) and the one "did you mean".

A mapping is described by a table ``{key: Field}`` (nested tables for sections); ``check_keys`` refuses
unknown keys with a suggestion, ``Field.check`` a value's type, choices and range. Every error is a
``ConfigError`` naming the source (file, override) and the dotted key. Rules that relate several keys stay
in code next to the table they belong to.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench.errors import ConfigError


def did_you_mean(word: object, options: Iterable[object], *, n: int = 3, cutoff: float = 0.5) -> str:
    """`` (did you mean 'a', 'b'?)`` for the options close to ``word``, else ""."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bound(x: float) -> str:
    return format(x, "g")


@dataclass(frozen=True)
class Field:
    """One key: its default, type, allowed values and range.

    ``kind``: the expected type (default: the default's type; ``float`` accepts integers and converts them).
    ``choices``: the allowed values (checked instead of the type). ``nullable``: ``null`` is allowed.
    ``ge``/``gt``/``le``/``lt``: the range, checked by ``check_range`` (configs check ranges after every
    override is merged). ``items``: the type of a list's items. ``free``: a free-form mapping, not checked
    key by key. ``expect``: how to say what is wanted in errors (e.g. "an integer >= 1"); without it the
    errors say "must be <type>" and "must be >= 1".
    """

    default: Any = None
    kind: type | None = None
    choices: tuple | None = None
    nullable: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    items: type | None = None
    free: bool = False
    expect: str | None = None

    @property
    def type(self) -> type:
        if self.kind is not None:
            return self.kind
        return type(self.default) if self.default is not None else str

    def _error(self, source: str, key: str, value: Any, why: str) -> ConfigError:
        if self.expect is not None:
            return ConfigError(f"{source}: '{key}' must be {self.expect}, got {value!r}")
        return ConfigError(f"{source}: '{key}' {why}")

    def check(self, value: Any, source: str, key: str) -> Any:
        """The value if its type or choice is right (ints converted for a float field)."""
        if self.free:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
            return value
        if value is None and self.nullable:
            return None
        if self.choices is not None:
            if value not in self.choices:
                why = f"must be one of {list(self.choices)}, got {value!r}"
                raise self._error(source, key, value, why + did_you_mean(value, self.choices))
            return value
        expected = self.type
        if expected is float:
            ok = is_number(value)
            value = float(value) if ok else value
        elif expected in (int, bool):
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
        else:
            ok = isinstance(value, expected)
        name = expected.__name__
        if ok and self.items is not None:
            ok = all(isinstance(v, self.items) and not isinstance(v, bool) for v in value)
            name = f"a list of {self.items.__name__}"
        if not ok:
            raise self._error(source, key, value, f"must be {name}, got {value!r}")
        return value

    def range_text(self) -> str:
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt)
        high = ("]", self.le) if self.le is not None else (")", self.lt)
        if low[1] is not None and high[1] is not None:
            return f"in {low[0]}{_bound(low[1])}, {_bound(high[1])}{high[0]}"
        if low[1] is not None:
            return f"{'>=' if self.ge is not None else '>'} {_bound(low[1])}"
        return f"{'<=' if self.le is not None else '<'} {_bound(high[1])}"

    def check_range(self, value: Any, source: str, key: str) -> None:
        if value is None or not is_number(value):
            return
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
            and not (isinstance(value, float) and math.isnan(value))
        )
        if not ok:
            raise self._error(source, key, value, f"must be {self.range_text()}")

    @property
    def has_range(self) -> bool:
        return any(b is not None for b in (self.ge, self.gt, self.le, self.lt))


Table = dict  # key -> Field or a nested Table


def check_keys(
    mapping: dict, allowed: Iterable[str], source: str, where: str = "", *, listed: bool = False
) -> None:
    """Refuse a key not in ``allowed``, naming it dotted and suggesting the closest ones (``listed``: also
    list every allowed key)."""
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            dotted = f"{where}.{key}" if where else str(key)
            tail = f"; allowed: {', '.join(allowed)}" if listed else ""
            raise ConfigError(f"{source}: unknown key '{dotted}'{did_you_mean(key, allowed)}{tail}")


def defaults(table: Table) -> dict:
    """The defaults of a table, as a plain nested dict."""
    return {k: defaults(f) if isinstance(f, dict) else _copy(f.default) for k, f in table.items()}


def _copy(value: Any) -> Any:
    return [*value] if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def walk(table: Table, prefix: str = "") -> Iterable[tuple[str, Field]]:
    """(dotted key, field) of every leaf."""
    for key, f in table.items():
        if isinstance(f, dict):
            yield from walk(f, f"{prefix}{key}.")
        else:
            yield prefix + key, f


def check_ranges(table: Table, cfg: dict, source: str) -> None:
    """Every leaf's range, in table order."""
    for dotted, f in walk(table):
        if f.has_range:
            node: Any = cfg
            for part in dotted.split("."):
                node = node[part]
            f.check_range(node, source, dotted)
