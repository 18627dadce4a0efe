"""Errors caused by input or set-up that the user fixes: the CLI prints their message alone."""

import difflib
import importlib
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse


def did_you_mean(name: str, candidates: Sequence[str], n: int = 1, cutoff: float = 0.5) -> str:
    """``did you mean 'a', 'b'?`` with the nearest of ``candidates``, or "" when none is near."""
    near = difflib.get_close_matches(name, list(candidates), n=n, cutoff=cutoff)
    return f"did you mean {', '.join(repr(c) for c in near)}?" if near else ""


class UserError(Exception):
    """Bad input or missing set-up; the message names the bad value and the fix."""


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors behind it (causes and contexts), each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def find_user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind ``error``, if any (jsonargparse wraps errors raised while it
    instantiates the configured classes)."""
    return next((e for e in error_chain(error) if isinstance(e, UserError)), None)


def spawned_user_error(error: BaseException) -> str | None:
    """The message of a UserError raised in a process that ddp_spawn started: torch hands back
    only its traceback as text, whose last line is ``module.Class: message``."""
    if type(error).__name__ != "ProcessRaisedException":
        return None
    last = str(error).strip().splitlines()[-1]
    path, _, message = last.partition(": ")
    module, _, name = path.rpartition(".")
    try:
        raised = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return message if isinstance(raised, type) and issubclass(raised, UserError) else None


class ConfigError(UserError, ValueError):
    """A configured value is invalid or inconsistent."""


class MissingWeightsError(UserError, RuntimeError):
    """A model's weights are neither on disk nor downloadable."""


def torchvision_weights_file(weights) -> Path:
    """Where torchvision looks for a weights enum's file ($TORCH_HOME/hub/checkpoints/<name>), for
    messages that tell an offline user where to put it."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def check_choice(key: str, value, choices) -> None:
    """``value`` is one of ``choices`` (a ``Literal[...]`` type, which jsonargparse also checks at
    config time, or a tuple), or one line naming the key, the value, the choices and the nearest."""
    options = typing.get_args(choices) or tuple(choices)
    if value in options:
        return
    hint = did_you_mean(str(value), [str(o) for o in options])
    raise ConfigError(f"{key} '{value}' is not one of {options}" + (f"; {hint}" if hint else ""))


def check_in_range(key: str, value, low=None, high=None, default=None) -> None:
    """``low <= value <= high`` (either bound may be None), or one line that names the key, the
    bad value, the nearest valid value and the default."""
    if value is None or ((low is None or value >= low) and (high is None or value <= high)):
        return
    nearest = low if low is not None and value < low else high
    interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    usual = f", default {default}" if default is not None else ""
    raise ConfigError(f"{key} is {value}, outside {interval}: the nearest valid value is {nearest}{usual}")


def whole_number(key: str, value, low=None, high=None, default=None) -> int:
    """``value`` as an int when it is a whole number: an int, a numpy integer, or an integral
    float such as ``50.0`` (what Python and numpy code passes); one line otherwise, or when it
    lies outside ``[low, high]`` (see ``check_in_range``)."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ConfigError(
            f"{key} is {value!r}, not a whole number"
            + (f" (default {default})" if default is not None else "")
        )
    check_in_range(key, int(value), low, high, default)
    return int(value)


def real_number(key: str, value, low=None, high=None, default=None) -> float:
    """``value`` as a float when it is a real number (int, float, numpy scalar), in
    ``[low, high]``; one line otherwise."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(
            f"{key} is {value!r}, not a finite number"
            + (f" (default {default})" if default is not None else "")
        )
    check_in_range(key, float(value), low, high, default)
    return float(value)
