"""Typed runtime options: each runtime declares what `--option KEY=VALUE` (CompileOptions.extra) it reads.

A runtime module lists its settings as `OPTIONS` (a list of `Option`); the settings several
runtimes read (the dense conv engines of the shared executor, the chooser) are declared once
here and listed by each runtime that honours them. `validate` is the boundary check: it turns
the strings the CLI gets into typed values and refuses an unknown key or a bad value with one
line naming what is valid, so a typo can no longer be ignored silently. It fills in nothing:
a key left out keeps meaning "the runtime's default" (`Option.default` documents it).
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable

from ..common.errors import UserError
from .torch.dense_conv import CHOICES as DENSE_CONV_CHOICES
from .torch.dense_conv import DEFAULT_IM2COL_MAX_BYTES

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One setting: `type` is bool, int, float, str or list (comma separated, items of `item`)."""
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None   # allowed values (of each item, for a list)
    item: type = str               # item type of a list option
    minimum: float | None = None   # smallest allowed number

    @property
    def type_name(self) -> str:
        base = self.item if self.type is list else self.type
        text = "|".join(map(str, self.choices)) if self.choices else base.__name__
        return f"list of {text}" if self.type is list else text

    def parse(self, value: Any) -> Any:
        """The typed value of `value` (a CLI string or an already typed value); ValueError says why not."""
        if value is None:
            return None
        if self.type is list:
            items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else list(value)
            if not items and self.choices is not None:  # a pick from a set that picks nothing is a slip, not a wish
                raise ValueError(f"names none of {', '.join(map(str, self.choices))}")
            return [self._scalar(v, self.item) for v in items]
        return self._scalar(value, self.type)

    def _scalar(self, value: Any, kind: type) -> Any:
        if kind is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, int) and value in (0, 1):
                out = bool(value)
            elif isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                out = value.strip().lower() in _TRUE
            else:
                raise ValueError(f"not a boolean (use one of {'/'.join(_TRUE + _FALSE)})")
        elif kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"not {'an integer' if kind is int else 'a number'}")
            try:
                out = kind(value.strip()) if isinstance(value, str) else kind(value)
            except ValueError:
                raise ValueError(f"not {'an integer' if kind is int else 'a number'}") from None
            if kind is int and isinstance(value, float) and out != value:
                raise ValueError("not an integer")
            if self.minimum is not None and out < self.minimum:
                raise ValueError(f"below the minimum {self.minimum}")
        else:
            out = str(value).strip() if isinstance(value, str) else value
            if not isinstance(out, str):
                raise ValueError("not a string")
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"choose one of {', '.join(map(str, self.choices))}")
        return out


# --- settings several runtimes read, declared once --------------------------------------------

DENSE_CONV = Option("dense_conv", str, "cudnn", "how layers left dense run their Conv: one engine, or best = per layer "
                    "the fastest, measured on the GPU (runtimes/torch/dense_conv.py)", choices=DENSE_CONV_CHOICES)
CUDNN_BENCHMARK = Option("cudnn_benchmark", bool, None, "let cuDNN try its algorithms for each dense conv "
                         "(default: on when dense_conv=best)")
IM2COL_MAX_BYTES = Option("im2col_max_bytes", int, DEFAULT_IM2COL_MAX_BYTES,
                          "skip the im2col dense convs whose column buffer would be larger", minimum=0)
DENSE_CONV_OPTIONS = [DENSE_CONV, CUDNN_BENCHMARK, IM2COL_MAX_BYTES]

GUARD = Option("guard", bool, True, "an engine slower than the best dense engine falls back to dense and says so")
CHOOSE_MARGIN = Option("choose_margin", float, 0.03, "a sparse candidate must beat the best dense form by this "
                       "fraction", minimum=0.0)
CHOOSE_REPS = Option("choose_reps", int, 30, "timed repetitions per candidate when choosing", minimum=1)
CHOOSER_OPTIONS = [GUARD, CHOOSE_MARGIN, CHOOSE_REPS]

# what a runtime built on the shared executor honours: dense convs and the chooser
SHARED_OPTIONS = DENSE_CONV_OPTIONS + CHOOSER_OPTIONS


def with_default(option: Option, default: Any, help: str | None = None) -> Option:
    """A shared option with this runtime's own default (e.g. ecr runs dense_conv=best)."""
    return replace(option, default=default, help=help or option.help)


# --- lookup and validation ------------------------------------------------------------------

def declared_options(runtime: str) -> dict[str, Option]:
    """The options runtime `runtime` declares, by name (UserError for an unknown runtime)."""
    from . import get_runtime

    module = get_runtime(runtime)
    return {o.name: o for o in module.OPTIONS}


def _hint(runtime: str) -> str:
    return f"see `sparsecnn doctor --options {runtime}`"


def _unknown_key(key: str, where: str, valid: Iterable[str], hint: str) -> UserError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown option '{key}' for {where}{guess}; valid options: {', '.join(valid) or 'none'}; {hint}")


def _parse(option: Option, key: str, value: Any, runtime: str) -> Any:
    try:
        return option.parse(value)
    except ValueError as exc:
        raise UserError(f"bad value for option {key}={value} (runtime '{runtime}', {option.type_name}): {exc}; "
                        f"{_hint(runtime)}") from None


def validate(runtime: str, extra: dict) -> dict:
    """`extra` with every value typed; UserError for a key `runtime` does not declare or a bad value."""
    declared = declared_options(runtime)
    out = {}
    for key, value in (extra or {}).items():
        if key not in declared:
            raise _unknown_key(key, f"runtime '{runtime}'", declared, _hint(runtime))
        out[key] = _parse(declared[key], key, value, runtime)
    return out


def validate_for_runtimes(runtimes: Iterable[str], extra: dict) -> dict[str, dict]:
    """Per runtime, the typed options it declares: a key is valid when some runtime declares it
    and goes only to those that do (bench runs several runtimes with one set of --option)."""
    runtimes = list(runtimes)
    declared = {r: declared_options(r) for r in runtimes}
    out: dict[str, dict] = {r: {} for r in runtimes}
    for key, value in (extra or {}).items():
        takers = [r for r in runtimes if key in declared[r]]
        if not takers:
            valid = set().union(*(d.keys() for d in declared.values())) if declared else set()
            where = f"runtimes {', '.join(runtimes)}" if len(runtimes) != 1 else f"runtime '{runtimes[0]}'"
            raise _unknown_key(key, where, valid, _hint(runtimes[0] if runtimes else "RUNTIME"))
        for r in takers:
            out[r][key] = _parse(declared[r][key], key, value, r)
    return out


def validate_saved(runtime: str, extra: dict) -> dict:
    """Options read back from an engine file: typed like `validate`, but a key this version does not
    declare, or a value it cannot parse, is dropped with a warning (the engine was built with it
    already; refusing to load would only lose the engine)."""
    declared = declared_options(runtime)
    out = {}
    for key, value in (extra or {}).items():
        if key not in declared:
            warnings.warn(f"engine option '{key}' is not an option of runtime '{runtime}' here: ignored")
            continue
        try:
            out[key] = declared[key].parse(value)
        except ValueError as exc:
            warnings.warn(f"engine option {key}={value!r} ignored: {exc}")
    return out


def describe(runtime: str) -> list[dict]:
    """Rows (name, type, default, help) for listing a runtime's options."""
    return [{"name": o.name, "type": o.type_name, "default": o.default, "help": o.help}
            for o in sorted(declared_options(runtime).values(), key=lambda o: o.name)]


def format_options(runtime: str) -> str:
    """The text `sparsecnn doctor --options RUNTIME` prints."""
    rows = describe(runtime)
    width = max(len(r["name"]) for r in rows) if rows else 0
    lines = [f"options of runtime '{runtime}' (--option KEY=VALUE; lists comma separated):"]
    for r in rows:
        default = "runtime decides" if r["default"] is None else r["default"]
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "empty"
        lines.append(f"  {r['name']:<{width}}  {r['type']}, default {default}: {r['help']}")
    return "\n".join(lines)
