"""The machinery behind ServerConfig's flags: each flag is a dataclass field whose metadata is a `Flag`.

Kept apart from config.py so that file is the list of settings and nothing else. From one `flag(...)`
declaration come the argparse argument (`Flag.add_to`), the `CTXSTEER_<FLAG>` env var (`Flag.from_env`)
and the value checks (`Check`s, run by ServerConfig.__post_init__). Messages name the flag or env var,
so the CLI can print one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None


def rule(ok: Callable[[Any], bool], message: str) -> Check:
    """A check from a predicate; `message` may show the value as {v} or {v!r}."""
    return lambda v: None if ok(v) else message.format(v=v)


def at_least(low: float, got: bool = True, finite: bool = False) -> Check:
    message = f"must be >= {low}" + (", got {v}" if got else "")
    return rule(lambda v: (not finite or math.isfinite(v)) and v >= low, message)


def above_zero(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"must be > 0, got {v}"


def share(v: float) -> str | None:
    return None if math.isfinite(v) and 0 <= v <= 1 else f"must be in [0, 1], got {v}"


def one_of(choices: tuple[str, ...], got: bool = True) -> Check:
    return rule(lambda v: v in choices, f"must be one of {choices}" + (", got {v!r}" if got else ""))


NOT_EMPTY = rule(lambda v: v.strip() != "", "must not be empty")
ASCII = rule(str.isascii, "must be ASCII")

_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


@dataclass(frozen=True, slots=True)
class Flag:
    """One server flag: what argparse, the env var and the checks need, beside the field's default."""

    flag: str
    help: str
    checks: tuple[Check, ...] = ()
    choices: tuple[str, ...] | None = None  # argparse's choices (the checks say what the dataclass takes)
    vllm_only: bool = False  # a vLLM engine setting: refused with the local engine
    local_only: str = ""  # a local engine setting, refused with --engine vllm: why it does not apply
    negatable: bool = False  # bool flag with a --no- form
    field: str = ""  # filled from the dataclass field, with kind and default
    kind: type = str
    default: Any = None

    @property
    def env(self) -> str:
        return "CTXSTEER_" + self.flag.lstrip("-").replace("-", "_").upper()

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """The argparse argument. Its default stays None so "not given" differs from any value."""
        kwargs: dict[str, Any] = {"default": None, "dest": self.field, "help": self.help}
        if self.kind is tuple:
            kwargs["action"] = "append"
        elif self.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if self.negatable else "store_true"
        else:
            kwargs["type"] = self.kind
        if self.choices:
            kwargs["choices"] = self.choices
        parser.add_argument(self.flag, **kwargs)

    def from_env(self, raw: str) -> Any:
        """The value of a non-empty, stripped env var, parsed as argparse would parse the flag."""
        if self.kind is tuple:
            return (raw,)
        if self.kind is bool:
            if raw.lower() not in _BOOLS:
                raise ValueError(f"{self.env}={raw!r}: expected true or false")
            return _BOOLS[raw.lower()]
        if self.choices and raw.lower() in self.choices:
            raw = raw.lower()
        try:
            value = self.kind(raw)
        except ValueError:
            raise ValueError(f"{self.env}={raw!r}: expected {self.kind.__name__}") from None
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.env}={raw!r}: expected one of {self.choices}")
        return value


def flag(name: str, default: Any, help: str, *checks: Check, **options: Any) -> Any:
    """A dataclass field that is also a server flag (`options`: the rest of Flag)."""
    return field(default=default, metadata={"flag": Flag(name, help, checks, **options)})


def _kind(annotation: str) -> type:
    """The flag's value type, from the field's annotation (a string: `from __future__ import annotations`)."""
    base = annotation.removesuffix(" | None")
    return tuple if base.startswith("tuple[") else _KINDS[base]


def flags_of(cls: type) -> tuple[Flag, ...]:
    """The Flag of every field of dataclass `cls`, completed with the field's name, kind and default."""
    return tuple(
        dataclasses.replace(f.metadata["flag"], field=f.name, kind=_kind(f.type), default=f.default)
        for f in dataclasses.fields(cls)
    )
