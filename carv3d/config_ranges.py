"""The valid range of every numeric config key, stated next to its default.

A numeric field of a config dataclass is declared with one of the helpers below instead of a bare
default::

    log_every: int = between(1, MAX_STEPS, 10)           # [1, 10^8]
    lr_grid: float = between(0.0, 10.0, 0.01)            # [0, 10]
    faces: int = between(MIN_FACES, 10**8, 50000, off=0)  # 0 (off) or [4, 10^8]
    fovy_range: List[float] = between(0.0, 180.0, [50.0, 50.0], low_open=True, high_open=True, pair=True)

Every helper takes ``help=``, the key's one-line description (``carv3d train --help-config`` prints
it with the range); a key that is not numeric states its description with :func:`described`::

    device: str = described("auto", "where to train: auto | cpu | cuda | cuda:N")

The helper returns a :func:`dataclasses.field` whose ``metadata["range"]`` is a :class:`NumericSpec`
and ``metadata["help"]`` the description;
:mod:`carv3d.config` walks the schema's dataclasses (with each seam's chosen implementation) and
checks every value against it, raising :class:`carv3d.errors.ConfigError` with the key, the value,
the allowed range and what to do. Every bound is finite and every value must be finite: NaN and ±inf
are rejected everywhere (no key documents otherwise).

This module imports nothing from carv3d but the errors, so the config (and a library class that is
handed an unvalidated dataclass) can use it without a cycle.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from carv3d.errors import ConfigError

Number = Union[int, float]


def _fmt(x: Number) -> str:
    """``100000000`` for an integer (as it must be typed), ``1e6``, ``0.5`` for a float."""
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) >= 1e5:
        mantissa, exponent = f"{x:e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A closed, half-open or open interval with finite ends, plus an optional "off" value outside it.

    ``integer`` only changes the wording ("an integer" or "a number"); the type itself is checked by
    OmegaConf before any range is.
    """

    low: Number
    high: Number
    low_open: bool = False
    high_open: bool = False
    off: Optional[Number] = None  # e.g. 0 for "0 = off" when the interval starts above 0
    power_of_two: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"a config range needs finite bounds with low <= high, not {self.low}, {self.high}")

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.off is not None and value == self.off:
            return True
        if value < self.low or (self.low_open and value == self.low):
            return False
        if value > self.high or (self.high_open and value == self.high):
            return False
        if self.power_of_two and not (float(value).is_integer() and int(value) > 0 and int(value) & (int(value) - 1) == 0):
            return False
        return True

    def describe(self) -> str:
        """``an integer in [1, 100000000]``, ``0 (off) or a power of two in [16, 8192]``, ``a finite number in (0, 10]``."""
        what = "a power of two" if self.power_of_two else "an integer" if self.integer else "a finite number"
        interval = f"{'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        text = f"{what} in {interval}"
        return f"{_fmt(self.off)} (off) or {text}" if self.off is not None else text


@dataclass(frozen=True)
class NumericSpec:
    """What a numeric key may hold.

    Attributes:
        range: each number's range (each element's, for a list).
        kind: ``scalar``, ``list`` (every element in ``range``; ``length`` if set), ``pair`` (a
            ``[low, high]`` list with low <= high) or ``rows`` (a list of rows, column j in
            ``columns[j]``).
        words: strings the key also accepts (``auto``); a string that reads as a number is
            converted to one (``"8"`` from a sweep file or the command line).
    """

    range: Range
    kind: str = "scalar"
    length: Optional[int] = None
    columns: tuple[Range, ...] = ()
    column_names: tuple[str, ...] = ()
    words: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "pair":
            return f"[low, high] with low <= high, each {self.range.describe()}"
        if self.kind == "list":
            size = f"{self.length} values" if self.length else "a list of values"
            return f"{size}, each {self.range.describe()}"
        if self.kind == "rows":
            names = ", ".join(self.column_names)
            each = "; ".join(f"{n} {c.describe()}" for n, c in zip(self.column_names, self.columns))
            return f"a list of [{names}] rows ({each})"
        words = " or ".join(f"'{w}'" for w in self.words)
        return f"{words} or {self.range.describe()}" if words else self.range.describe()


def _field(default: Any, spec: Optional[NumericSpec], help: str = "") -> Any:
    metadata: dict[str, Any] = {"help": help} if help else {}
    if spec is not None:
        metadata["range"] = spec
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: [list(v) if isinstance(v, list) else v for v in default],
                                 metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def described(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` and a one-line description (a key with no numeric range)."""
    return _field(default, None, help)


def between(low: Number, high: Number, default: Any, *, low_open: bool = False, high_open: bool = False,
            off: Optional[Number] = None, power_of_two: bool = False, pair: bool = False,
            length: Optional[int] = None, words: Sequence[str] = (), help: str = "") -> Any:
    """A dataclass field with ``default`` whose value (each element, for a list) lies in ``[low, high]``.

    Args:
        low_open, high_open: exclude that end.
        off: one more allowed value outside the interval, meaning "off" (e.g. 0).
        power_of_two: only powers of two in the interval (and ``off``).
        pair: the value is ``[low, high]`` with low <= high.
        length: the list must have exactly this many elements.
        words: strings also accepted (``"auto"``).
        help: the key's one-line description.
    """
    sample = default[0] if isinstance(default, list) and default else default
    rng = Range(low, high, low_open, high_open, off, power_of_two,
                integer=isinstance(sample, int) and not isinstance(low, float))
    if pair:
        spec = NumericSpec(rng, kind="pair", length=2)
    elif isinstance(default, list):
        spec = NumericSpec(rng, kind="list", length=length)
    else:
        spec = NumericSpec(rng, words=tuple(words))
    return _field(default, spec, help)


def positive(default: Number, high: Number, *, help: str = "") -> Any:
    """An integer in [1, high] or a number in (0, high]."""
    if isinstance(default, int):
        return between(1, high, default, help=help)
    return between(0.0, high, default, low_open=True, help=help)


def fraction(default: float, *, low_open: bool = False, high_open: bool = False, help: str = "") -> Any:
    """A number in [0, 1] (a probability, a weight of a mixture)."""
    return between(0.0, 1.0, default, low_open=low_open, high_open=high_open, help=help)


def rows(default: list, *, help: str = "", **columns: Range) -> Any:
    """A list of rows ``[[a, b], ...]``, one column per keyword (its name and range), in order."""
    ranges = tuple(columns.values())
    return _field(default, NumericSpec(ranges[0], kind="rows", columns=ranges, column_names=tuple(columns)), help)


# ------------------------------------------------------------------------------------------ checking


def spec_of(f: dataclasses.Field) -> Optional[NumericSpec]:
    return f.metadata.get("range")


def help_of(f: dataclasses.Field) -> str:
    """A field's one-line description ("" when it has none)."""
    return f.metadata.get("help", "")


def walk_help(cls: type, prefix: str = "", choose: Optional[Callable[[str, type], type]] = None
              ) -> Iterator[tuple[str, str]]:
    """``(dotted key, description)`` for every field of ``cls`` and its nested dataclasses, depth
    first; a section's description is the first line of its class docstring."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if spec_of(f) is None and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub = choose(key, hint) if choose else hint
            yield key, (sub.__doc__ or "").strip().splitlines()[0] if sub.__doc__ else ""
            yield from walk_help(sub, key + ".", choose)
        else:
            yield key, help_of(f)


@dataclass(frozen=True)
class KeySpec:
    """A numeric key of the schema: its dotted name, what it may hold and its default."""

    key: str
    spec: NumericSpec
    default: Any


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def walk_specs(cls: type, prefix: str = "", choose: Optional[Callable[[str, type], type]] = None
               ) -> Iterator[KeySpec]:
    """Every numeric field of the dataclass ``cls`` and of its nested dataclasses, depth first.

    ``choose(key, declared_class)`` may swap a nested section's class (a seam's chosen implementation).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        spec = spec_of(f)
        if spec is not None:
            yield KeySpec(key, spec, _default(f))
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            sub = choose(key, hint) if choose else hint
            yield from walk_specs(sub, key + ".", choose)


def _as_number(value: Any, integer: bool) -> Any:
    """A string that reads as a number, as that number (int for an integer key); else the value."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return int(text) if integer else float(text)
    except ValueError:
        return value


def _plain(value: Any) -> Any:
    """A ListConfig (or nested lists of them) as plain lists, for a message."""
    if isinstance(value, (str, bytes, int, float)) or value is None:
        return value
    try:
        return [_plain(v) for v in value]
    except TypeError:
        return value


def _bad(key: str, value: Any, spec: NumericSpec, default: Any = None, detail: str = "") -> ConfigError:
    shown = _plain(value)
    shown = f"'{shown}'" if isinstance(shown, str) else shown
    default = _plain(default)
    hint = f" (the default is {repr(default) if isinstance(default, str) else default})" if default is not None else ""
    extra = f" {detail}" if detail else ""
    return ConfigError(f"config key '{key}' is {shown}; expected {spec.describe()}.{extra} "
                       f"Set it to a value in that range{hint}.")


def check_value(key: str, value: Any, spec: NumericSpec, default: Any = None) -> Any:
    """Check one key's value against its spec; returns the value, with a numeric string converted.

    Raises:
        ConfigError: one line with the key, the value, the allowed range and what to do.
    """
    rng = spec.range
    if spec.kind == "scalar":
        if isinstance(value, str):
            if value.strip() in spec.words:
                return value.strip()
            value = _as_number(value, rng.integer)
            if rng.integer and isinstance(value, float):  # "8.5" for an integer key
                raise _bad(key, value, spec, default)
        if value not in rng:
            raise _bad(key, value, spec, default)
        return value
    items = list(value)
    if spec.kind == "rows":
        for row in items:
            row = _plain(row)
            if not isinstance(row, list) or len(row) != len(spec.columns) or not all(v in c for v, c in zip(row, spec.columns)):
                raise _bad(key, items, spec, default, detail=f"The row {row} is out of range.")
        return value
    if spec.length is not None and len(items) != spec.length or not all(v in rng for v in items):
        raise _bad(key, items, spec, default)
    if spec.kind == "pair" and items[0] > items[1]:
        raise ConfigError(f"config key '{key}' must be [low, high] with low <= high, not {_plain(items)}; "
                          f"swap the two values.")
    return value
