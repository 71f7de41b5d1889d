"""The type of one entry of the option table (`wq_ops.config.options`): its name, target field, kind of value,
default (a value, or one that depends on the other options) and help."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Mapping

from wq_ops.config.enums import Method

__all__ = ["Kind", "Dependent", "Option"]


class Kind(str, Enum):
    """How a value is read from YAML or the command line."""

    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    CHOICE = "choice"                 # a member of the option's enum, by value
    GROUP_SIZE = "group_size"         # an integer, or 'channel' (None: one group per row)
    INT_LIST = "int_list"             # "1,2,4" or a list
    PATTERNS = "patterns"             # "a,b" or a list of fnmatch patterns
    FRACTION_OR_OFF = "fraction_or_off"   # a number in [0, 1], or 'off' (None)


@dataclass(frozen=True)
class Dependent:
    """A default that depends on the other options given: fn(options) with what was given so far; `shown`
    is how the help text states it."""

    fn: Callable[[Mapping[str, Any]], Any]
    shown: str


@dataclass(frozen=True)
class Option:
    name: str                         # YAML key; the flag is --name with '-' for '_'
    target: str                       # the config field it sets: "job.out", "quant.gptq.damp_frac", ...
    kind: Kind
    default: Any                      # a value, or a Dependent
    help: str
    fingerprint: bool                 # its value enters the staging fingerprint (it changes the artifact)
    choices: type[Enum] | None = None
    negative: str | None = None       # BOOL: the flag that sets it false (--asym, --no-act-order)
    method: Method | None = None      # applies to this method only: given for another, it is an error
    cli: bool = True                  # False: YAML and the Python entry only (a testing hook)

    @property
    def takes_none(self) -> bool:
        """A null given for it reaches its checks: None is one of its values (a group per row; unset paths and
        addresses), or its default depends on the others (`out: null` is an error, not the default path).
        Otherwise a null leaves it at its default."""
        return self.default is None or isinstance(self.default, Dependent) or self.kind in (Kind.GROUP_SIZE,
                                                                                            Kind.FRACTION_OR_OFF)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shown_default(self) -> str:
        if isinstance(self.default, Dependent):
            return self.default.shown
        if isinstance(self.default, Enum):
            return str(self.default.value)
        if self.default is None:
            return "none"
        return str(self.default)
