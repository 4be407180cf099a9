"""The search space of ``fusionkd tune``: ``[METHOD:]KEY=DIST`` items (or a YAML file) -> :class:`Param`
dimensions, checked against the method's options and the config schema; and the studies' ``key=value``
settings (:func:`parse_common`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine.config import Config, ConfigError, load_yaml, parse_override

KINDS = ("uniform", "loguniform", "int", "logint", "choice")
#: config keys a study may not tune: they belong to the study or to each trial, or they change what the score
#: measures (the validation split)
RESERVED = ("method", "seed", "name", "out_dir", "progress", "val_fraction", "data_seed", "dataset")


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a config key (dotted, e.g. ``options.alpha``) and its distribution."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.kind == "logint")
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform", step=self.step)

    def extremes(self) -> list[Any]:
        """Values every trial's config must accept (checked before the study starts)."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(map(str, self.choices))}"
        step = f":{self.step:g}" if self.step else ""
        return f"{self.key}={self.kind}:{self.low:g}:{self.high:g}{step}"


def _config_key(method: str, name: str, where: str) -> str:
    """``alpha`` -> ``options.alpha`` when it is an option of ``method``; a config key stays as it is."""
    from ..methods import METHODS

    cls = METHODS.get(method)
    option_names = {f.name for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(cls.Options) else set()
    config_fields = {f.name for f in dataclasses.fields(Config)}
    if name.startswith("options."):
        name = name[len("options."):]
    if name in option_names:
        return f"options.{name}"
    top = name.split(".", 1)[0]
    if top in RESERVED:
        raise ConfigError(f"{where}: {top!r} cannot be tuned (it is fixed by the study or each trial)")
    if top not in config_fields:
        raise ConfigError(f"{where}: {name!r} is neither an option of {method!r} "
                          f"({', '.join(sorted(option_names)) or 'it has none'}) nor a config option (docs/config.md)")
    return name


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {text!r} is not a finite number")
    return v


def parse_distribution(key: str, spec: str | dict[str, Any], where: str) -> Param:
    """``"loguniform:0.5:4"``, ``"int:10:200"``, ``"int:10:200:10"``, ``"uniform:0:1"``, ``"choice:a,b"`` (or
    the same as a mapping ``{type: loguniform, low: 0.5, high: 4}``) -> :class:`Param`."""
    if isinstance(spec, dict):
        kind = str(spec.get("type", ""))
        step = [str(spec["step"])] if "step" in spec else []
        parts = [kind] + ([",".join(map(str, spec.get("choices") or []))] if kind == "choice" else
                          [str(spec.get("low")), str(spec.get("high")), *step])
    else:
        parts = str(spec).split(":")
        kind = parts[0]
    accepted = "uniform:LOW:HIGH[:STEP], loguniform:LOW:HIGH, int:LOW:HIGH[:STEP], logint:LOW:HIGH, choice:A,B,..."
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; accepted: {accepted}")
    if kind == "choice":
        if len(parts) != 2 or not parts[1].strip():
            raise ConfigError(f"{where}: choice needs its values, e.g. choice:0.05,0.1 ({accepted})")
        from ..engine.config import read_value

        choices = tuple(read_value(c.strip()) for c in parts[1].split(",") if c.strip())
        return Param(key, "choice", choices=choices)
    if len(parts) not in (3, 4) or (len(parts) == 4 and kind in ("loguniform", "logint")):
        raise ConfigError(f"{where}: {':'.join(parts)!r} does not match {accepted}")
    low, high = _number(parts[1], where), _number(parts[2], where)
    step = _number(parts[3], where) if len(parts) == 4 else None
    if not low < high:
        raise ConfigError(f"{where}: LOW must be below HIGH, got {low:g} and {high:g}")
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{where}: a log distribution needs LOW > 0, got {low:g}")
    if kind in ("int", "logint") and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: int bounds must be integers, got {low:g} and {high:g}")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: STEP must be positive, got {step:g}")
    return Param(key, kind, low, high, step)


def parse_space(items: Sequence[str], method: str, space_file: str | None = None) -> list[Param]:
    """Command-line items ``[METHOD:]KEY=DIST`` and/or a YAML file ``{"[METHOD:]KEY": DIST, ...}``."""
    entries: list[tuple[str, Any, str]] = []
    if space_file:
        data = load_yaml(space_file)
        data = data.get("space", data)
        if not isinstance(data, dict):
            raise ConfigError(f"{space_file}: expected a mapping of KEY: DISTRIBUTION")
        entries += [(str(k), v, f"{space_file}: {k}") for k, v in data.items()]
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: expected [METHOD:]KEY=DISTRIBUTION, "
                              "e.g. frskd:alpha=loguniform:0.5:4")
        k, v = item.split("=", 1)
        entries.append((k.strip(), v.strip(), f"--space {item!r}"))
    params: dict[str, Param] = {}
    for raw_key, dist, where in entries:
        name = raw_key
        if ":" in raw_key:
            prefix, name = raw_key.split(":", 1)
            if prefix != method:
                raise ConfigError(f"{where}: it is for method {prefix!r}, but this study tunes {method!r}")
        key = _config_key(method, name.strip(), where)
        if key in params:
            raise ConfigError(f"{where}: {key!r} is given twice in the search space")
        params[key] = parse_distribution(key, dist, where)
    if not params:
        raise ConfigError("the search space is empty: give --space KEY=DIST ... or --space-file FILE")
    return list(params.values())


def parse_common(items: Sequence[str]) -> dict[str, Any]:
    return dict(parse_override(o) for o in items)
