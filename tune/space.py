"""Search spaces: dotted config keys mapped to ranges or choices, checked against the config schema.

A space is the ``tune.space`` mapping of a config (YAML nests it under ``tune:``)::

    pruning.keep_ratio: {uniform: [0.1, 1.0]}      # float in [lo, hi]
    verification.num_candidates: {int: [1, 16]}    # integer in [lo, hi], both included
    drafting.threshold: {loguniform: [0.01, 0.9]}  # float, sampled on a log scale (lo > 0)
    branching.budget: {choice: [0, 2, 4]}          # one of the values
    link: {choice: {lan: {rtt_ms: 1.0}, lte: {rtt_ms: 50.0, up_mbps: 10.0}}}  # a section: one named mapping

Every trial config is an ordinary config: the base config with the trial's values applied, through the same loader
and validation as ``load_config``. :func:`parse_space` refuses, before any trial starts and naming the key: unknown
keys, keys that must not be searched (the data split, generation, tracking, ...), malformed specs and any bound or
choice that the config validator rejects.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from covspec.config import Config, config_to_dict, load_config_text
from covspec.errors import ConfigError

__all__ = [
    "DEFAULT_SPACE",
    "FIXED_SECTIONS",
    "Dimension",
    "candidate_config",
    "parse_dimensions",
    "parse_space",
    "space_of",
]

DEFAULT_SPACE: dict[str, Any] = {
    "pruning.keep_ratio": {"uniform": [0.1, 1.0]},
    "pruning.weights.relevance": {"uniform": [0.0, 2.0]},
    "pruning.weights.activity": {"uniform": [0.0, 2.0]},
    "pruning.weights.lowrank": {"uniform": [0.0, 2.0]},
    "drafting.threshold": {"uniform": [0.05, 0.9]},
    "drafting.gamma_min": {"int": [1, 4]},
    "drafting.gamma_max": {"int": [4, 32]},
    "branching.budget": {"int": [0, 4]},
    "branching.tree": {"int": [0, 3]},
    "verification.num_candidates": {"int": [1, 16]},
}
"""The space searched when ``tune.space`` is empty; ``configs/tune/default.yaml`` spells out the same mapping. The
link is not in it: it is the environment being tuned for (``link.*`` of the base config), not a knob."""

FIXED_SECTIONS = ("data", "generation", "tracking", "cluster", "tune", "method", "methods", "output", "threads")
"""Top-level keys a space must not search: the trial decides the data (val split) and the methods; generation
defines the task itself; the rest do not affect a trial."""

KINDS = ("uniform", "loguniform", "int", "choice")
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Dimension:
    """One searched key: a numeric range (``low``..``high``) or a list of choices.

    ``options`` maps choice names to mappings for a section key (e.g. ``link``); ``choices`` are then the names.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    options: dict[str, dict[str, Any]] | None = None

    def domain(self) -> Any:
        """The Ray Tune domain of this dimension (OptunaSearch converts it to an Optuna distribution)."""
        from ray import tune as raytune

        if self.kind == "uniform":
            return raytune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return raytune.loguniform(self.low, self.high)
        if self.kind == "int":
            return raytune.randint(self.low, self.high + 1)  # Tune's upper bound is exclusive
        return raytune.choice(list(self.choices))

    def bounds(self) -> list[tuple[str, Any]]:
        """The values that span the dimension, with a label each: both bounds, or every choice."""
        if self.kind == "choice":
            return [(f"choice {value!r}", value) for value in self.choices]
        return [(f"lower bound {self.low!r}", self.low), (f"upper bound {self.high!r}", self.high)]

    def apply(self, data: dict[str, Any], value: Any) -> None:
        """Sets this key to ``value`` in a nested config dict (a named mapping is merged into its section)."""
        *path, name = self.key.split(".")
        node = data
        for part in path:
            node = node[part]
        if self.options is not None:
            node[name] = {**node[name], **copy.deepcopy(self.options[value])}
        else:
            node[name] = value

    def value_in(self, cfg: Config) -> Any:
        """The value of this dimension in ``cfg``, or None when ``cfg`` lies outside the dimension."""
        value: Any = cfg
        for part in self.key.split("."):
            value = getattr(value, part)
        if self.options is not None:
            section = config_to_dict(value)
            return next((n for n, o in self.options.items() if all(section[k] == v for k, v in o.items())), None)
        if self.kind == "choice":
            return value if value in self.choices else None
        return value if self.low <= value <= self.high else None


def space_of(cfg: Config) -> dict[str, Any]:
    """The space ``cfg`` searches: ``tune.space``, or :data:`DEFAULT_SPACE` when that is empty."""
    return dict(cfg.tune.space) or copy.deepcopy(DEFAULT_SPACE)


def parse_space(cfg: Config) -> list[Dimension]:
    """The validated dimensions of ``cfg``'s space.

    Raises:
        ConfigError: naming ``tune.space.<key>``: an unknown or fixed key, a malformed spec, or a bound or choice
            that the config validator refuses in every corner of the other dimensions.
    """
    dims = parse_dimensions(space_of(cfg))
    _check_values(cfg, dims)
    return dims


def parse_dimensions(space: Mapping[str, Any]) -> list[Dimension]:
    """The dimensions of a space, checking keys and spec shapes only (:func:`parse_space` also checks values)."""
    return [_dimension(str(key), spec) for key, spec in space.items()]


def candidate_config(base: Config, dims: list[Dimension], params: Mapping[str, Any]) -> Config:
    """``base`` with the trial's values applied, loaded and validated like any config file.

    Raises:
        ConfigError: the combination is invalid (e.g. ``drafting.gamma_min`` > ``drafting.gamma_max``).
    """
    data = config_to_dict(base)
    for dim in dims:
        dim.apply(data, params[dim.key])
    return load_config_text(yaml.safe_dump(data, sort_keys=False), where="trial config")


# ---------------------------------------------------------------------------------------------------------------


def _field_type(key: str) -> Any:
    """The schema type of a dotted key; ConfigError naming the key if it does not exist."""
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            prefix = ".".join(parts[:i])
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f", did you mean {'.'.join([*parts[:i], close[0]])!r}?" if close else ""
            where = f" (no key {part!r} in {prefix or 'the config'})" if prefix else ""
            raise ConfigError(f"tune.space: unknown config key {key!r}{where}{hint}")
        tp = hints[part]
    return tp


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"tune.space.{key}"
    tp = _field_type(key)
    if key.split(".")[0] in FIXED_SECTIONS:
        raise ConfigError(f"{where}: {key} cannot be searched (a trial fixes data, generation and methods itself)")
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(
            f"{where} must be one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{int: [lo, hi]}}, "
            f"{{choice: [...]}}, got {spec!r}"
        )
    kind, arg = next(iter(spec.items()))
    section = dataclasses.is_dataclass(tp)
    if kind == "choice":
        return _choice(where, key, arg, section)
    if section or tp not in (int, float):
        raise ConfigError(f"{where}: {key} is not numeric: use {{choice: [...]}}")
    if kind != "int" and tp is int:
        raise ConfigError(f"{where}: {key} is an integer: use {{int: [lo, hi]}}")
    if not isinstance(arg, list | tuple) or len(arg) != 2:
        raise ConfigError(f"{where}.{kind} must be [lo, hi], got {arg!r}")
    low, high = arg
    number = (int,) if kind == "int" else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, number) for v in (low, high)):
        raise ConfigError(f"{where}.{kind} bounds must be {'integers' if kind == 'int' else 'numbers'}, got {arg!r}")
    if not low < high:
        raise ConfigError(f"{where}.{kind} must have lo < hi, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform needs lo > 0, got {low}")
    if kind != "int":
        low, high = float(low), float(high)
    return Dimension(key, kind, low, high)


def _choice(where: str, key: str, arg: Any, section: bool) -> Dimension:
    if section:
        if not isinstance(arg, Mapping) or not arg or not all(isinstance(v, Mapping) for v in arg.values()):
            raise ConfigError(f"{where}.choice must map names to mappings of {key}'s keys, got {arg!r}")
        options = {str(name): dict(value) for name, value in arg.items()}
        return Dimension(key, "choice", choices=tuple(options), options=options)
    if not isinstance(arg, list | tuple) or not arg:
        raise ConfigError(f"{where}.choice must be a non-empty list of values, got {arg!r}")
    if not all(isinstance(v, _SCALARS) for v in arg):
        raise ConfigError(f"{where}.choice values must be scalars (numbers, strings, true/false, null), got {arg!r}")
    if len(set(map(repr, arg))) != len(arg):
        raise ConfigError(f"{where}.choice lists a value twice: {arg!r}")
    return Dimension(key, "choice", choices=tuple(arg))


def _corner(dim: Dimension, which: str) -> Any:
    if dim.kind == "choice":
        return dim.choices[0] if which == "low" else dim.choices[-1]
    return dim.low if which == "low" else dim.high


def _check_values(cfg: Config, dims: list[Dimension]) -> None:
    """Every bound or choice must give a valid config with the other dimensions at the base values, all low or
    all high (cross-key rules such as gamma_min <= gamma_max may need the others moved too)."""
    base = config_to_dict(cfg)
    for dim in dims:
        for label, value in dim.bounds():
            first_error: ConfigError | None = None
            for corner in ("base", "low", "high"):
                data = copy.deepcopy(base)
                for other in dims:
                    if other is not dim and corner != "base":
                        other.apply(data, _corner(other, corner))
                dim.apply(data, value)
                try:
                    load_config_text(yaml.safe_dump(data, sort_keys=False), where=f"tune.space.{dim.key}")
                    break
                except ConfigError as err:
                    first_error = first_error or err
            else:
                raise ConfigError(f"tune.space.{dim.key}: {label} is not a valid value: {first_error}")
