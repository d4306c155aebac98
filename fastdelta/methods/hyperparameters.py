"""What a method declares about each of its hyperparameters, and the settings built from all of them.

A method lists its hyperparameters (`Method.hyperparameters`); fastdelta builds from the registry the
fields of FitSettings, the command line's options and `compare`'s search grid. Two methods that
declare the same name share one setting, so they must agree on its type and choices; a setting whose
methods all have the same fixed default gets that default, any other starts at None and takes the
chosen method's own default when the settings are resolved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

# the paper's search grid (section 4.2): alpha and beta from these five values
PAPER_GRID = (0.0001, 0.001, 0.01, 0.1, 0.2)


class HyperparameterError(ValueError):
    """A hyperparameter value, or two methods' declarations of one name, cannot work; the message names it."""


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a method: name (the setting and `--name` option), default, help, and either
    choices (a vocabulary) or a number type with a lower bound; `grid` is what `compare` searches on a
    validation split (None: not searched). A default that depends on other settings is a callable
    `default(settings) -> value` (settings: the resolved FitSettings or a mapping of hyperparameters);
    a default of None with `recipe=True` is the run's recipe's value (fastdelta.settings.RECIPES)."""
    name: str
    default: Any
    help: str
    type: type = float
    choices: Optional[Tuple[str, ...]] = None
    minimum: Optional[float] = 0.0
    grid: Optional[Tuple[float, ...]] = None
    recipe: bool = False

    def default_for(self, settings) -> Any:
        return self.default(settings) if callable(self.default) else self.default

    def check(self, value) -> None:
        """Raise a HyperparameterError naming this setting when `value` cannot work."""
        if self.choices is not None:
            if value not in self.choices:
                raise HyperparameterError(f"{self.name}={value!r}: expected one of {self.choices}")
            return
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.type is int and not isinstance(value, int) or not number or not math.isfinite(value):
            kind = "an integer" if self.type is int else "a finite number"
            raise HyperparameterError(f"{self.name}={value!r}: must be {kind}"
                                      + ("" if self.minimum is None else f" >= {self.minimum:g}"))
        if self.minimum is not None and value < self.minimum:
            kind = "an integer" if self.type is int else "a finite number"
            raise HyperparameterError(f"{self.name}={value!r}: must be {kind} >= {self.minimum:g}")


@dataclass(frozen=True)
class SettingField:
    """One FitSettings field made from the methods that declare the name."""
    name: str
    type: type
    choices: Optional[Tuple[str, ...]]
    default: Any             # the shared fixed default, else None (resolved per method or recipe)
    help: str
    methods: Tuple[str, ...]
    declaration: Hyperparameter  # the first method's: what a value is checked against


def _shared_default(declarations: Iterable[Hyperparameter]) -> Any:
    values = {repr(h.default) for h in declarations}
    first = next(iter(declarations))
    return first.default if len(values) == 1 and not callable(first.default) else None


def setting_fields(methods: Dict[str, type]) -> Dict[str, SettingField]:
    """The settings the registered `methods` declare, in first-declaration order."""
    declared: Dict[str, list] = {}
    for name, cls in methods.items():
        for h in cls.hyperparameters:
            declared.setdefault(h.name, []).append((name, h))
    fields = {}
    for key, entries in declared.items():
        first = entries[0][1]
        for method, h in entries[1:]:
            if (h.type, h.choices, h.recipe) != (first.type, first.choices, first.recipe):
                raise HyperparameterError(
                    f"hyperparameter {key!r}: method {method!r} declares type {h.type.__name__} / choices "
                    f"{h.choices} but {entries[0][0]!r} declares {first.type.__name__} / {first.choices}")
        hs = [h for _, h in entries]
        default = None if first.recipe else _shared_default(hs)
        fields[key] = SettingField(key, first.type, first.choices, default, _help(key, entries),
                                   tuple(m for m, _ in entries), first)
    return fields


def _help(key: str, entries) -> str:
    """The first declaration's help, and the default of each method when they differ."""
    first = entries[0][1]
    if first.recipe:
        return f"{first.help} (default: the recipe's)"
    if _shared_default([h for _, h in entries]) is not None or len(entries) == 1 and not callable(first.default):
        return f"{first.help} (default: {first.default})"
    per = ", ".join(f"{m}: {_describe_default(h)}" for m, h in entries)
    return f"{first.help} (default: the method's: {per})"


def _describe_default(h: Hyperparameter) -> str:
    return getattr(h.default, "describe", None) or (f"{h.default:g}" if isinstance(h.default, float)
                                                     else str(h.default))


def depends_on(describe: str, rule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A callable default with a description for help texts (e.g. '1e-4 public / 0.01 paper scaling')."""
    rule.describe = describe
    return rule


# declarations several methods share (one setting each)
BETA = Hyperparameter("beta", 0.01, "weight of the L2 term on the new head's parameters", grid=PAPER_GRID)
WEIGHT_DECAY = Hyperparameter("weight_decay", 1e-4, "weight decay of the plain fine-tune (l2, l2_fe)")
