"""jsonargparse's config errors as one line with the nearest valid key or class.

jsonargparse explains a bad key or class path in a nested report (every Union subtype it tried,
each with its error) after ~40 lines of usage; what the user needs is the bad value, where it is,
and what they probably meant.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import typing

from grounded_diffusion.errors import did_you_mean

# LightningCLI's own top-level keys of a subcommand (besides trainer.*).
TOP_LEVEL = (
    "config",
    "seed_everything",
    "model",
    "data",
    "optimizer",
    "lr_scheduler",
    "ckpt_path",
    "trainer",
    "print_config",
)


def _nearest(name: str, candidates: list[str]) -> str:
    hint = did_you_mean(name, candidates, cutoff=0.6)
    return f" ({hint})" if hint else ""


def _trainer_keys() -> list[str]:
    from lightning.pytorch import Trainer

    return [f"trainer.{p}" for p in inspect.signature(Trainer.__init__).parameters if p != "self"]


def _init_keys(class_path: str) -> list[str]:
    """The keys a class accepts: its __init__ arguments, and ``arg.field`` for dataclass arguments."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 (only a hint is at stake)
        return []
    keys = []
    for param in inspect.signature(cls.__init__).parameters:
        if param in ("self", "args", "kwargs"):
            continue
        keys.append(param)
        for option in typing.get_args(hints.get(param)) or (hints.get(param),):
            if dataclasses.is_dataclass(option):
                keys += [f"{param}.{f.name}" for f in dataclasses.fields(option)]
    return keys


def _class_candidates(module_path: str) -> list[str]:
    """Classes defined in a module, or the submodules of a package."""
    if not module_path:
        return []
    try:
        module = importlib.import_module(module_path)
    except ImportError:
        return []
    names = [
        f"{module_path}.{n}"
        for n, v in vars(module).items()
        if inspect.isclass(v) and v.__module__ == module.__name__
    ]
    if hasattr(module, "__path__"):
        names += [f"{module_path}.{m.name}" for m in pkgutil.iter_modules(module.__path__)]
    return names


def _innermost(message: str) -> tuple[list[str], str]:
    """The keys down to the innermost ``Parser key`` of a jsonargparse report, and that key's own
    section (its indented block: not the other Union alternatives tried beside it)."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = message.splitlines()
    start = max(i for i, line in enumerate(lines) if line.lstrip().startswith(f'Parser key "{keys[-1]}"'))
    indent = len(lines[start]) - len(lines[start].lstrip())
    section = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        section.append(line)
    return keys, "\n".join(section)


def _wrong_class(message: str) -> str | None:
    """A class path that names no subclass of what its key takes (or names the standard library,
    which jsonargparse is told to refuse unimported): the key, the class path and the base class."""
    if 'Parser key "' not in message:
        return None
    keys, section = _innermost(message)
    denied = re.findall(r"Importing '([^']+)' is not allowed, denied by", section)
    if not denied and "does not correspond to a subclass of" not in section:
        return None
    subtypes = re.findall(
        r"Subtypes: \[(.*)\]", section
    )  # e.g. [list[a.B], <class 'a.B'>, <class 'NoneType'>]
    names = [
        name
        for pair in re.findall(r"<class '([^']+)'>|\[([\w.]+)\]", subtypes[-1] if subtypes else "")
        for name in pair
        if name
    ]
    base = " or ".join(dict.fromkeys(n for n in names if n != "NoneType"))
    given = [g.strip() for g in re.findall(r"Given value: (.+)", section) if not g.startswith("NestedArg")]
    class_path = denied[-1] if denied else given[-1] if given else None
    if not base or not class_path:
        return None
    why = (
        "the standard library holds none, and a config may not name it"
        if denied
        else "a class_path there must name one"
    )
    return f"{'.init_args.'.join(keys)}: '{class_path}' is not a subclass of {base}: {why} (your own subclasses work)"


def one_line_config_error(error: Exception, argv: list[str]) -> str:
    message = str(error)
    wrong_class = _wrong_class(message)
    if wrong_class:
        return wrong_class
    group = re.match(r'Parser key "([^"]+)"', message)
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if group and problem:
        where, class_path, detail = group[1], problem[1], problem[2].strip()
        key = re.search(
            r"unrecognized arguments: --([^=\s]+)|Option '([^']+)' is not accepted|Key '([^']+)' is not expected",
            detail,
        )
        if key:
            name = next(k for k in key.groups() if k)
            return (
                f"{where}.init_args.{name}: {class_path} has no argument '{name}'"
                f"{_nearest(name, _init_keys(class_path))}"
            )
        missing = re.search(r"module '([^']+)' has no attribute '([^']+)'|No module named '([^']+)'", detail)
        if missing:
            module = missing[1] or class_path.rpartition(".")[0]
            return (
                f"{where}: no class '{class_path}'"
                f"{_nearest(class_path, _class_candidates(module) or _class_candidates(module.rpartition('.')[0]))}"
            )
    unknown = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([^=\s]+)", message)
    if unknown:
        name = unknown[1] or unknown[2]
        subcommand = next((a for a in argv if not a.startswith("-")), "")
        return f"{subcommand}: unknown key '{name}'{_nearest(name, [*TOP_LEVEL, *_trainer_keys()])}"
    if group:  # a bad value: the innermost key, what it expects and what it got
        keys = re.findall(r'Parser key "([^"]+)"', message)
        innermost = message[message.rindex(f'Parser key "{keys[-1]}"') :].splitlines()[1:]
        lines = [line.strip(" -") for line in innermost if line.strip()]
        expected = next(
            (line for line in lines if line.startswith("Expected")), lines[0] if lines else "invalid value"
        )
        given = next((line for line in lines if line.startswith("Given value:")), "")
        detail = f"{expected} ({given})" if given and "Got value" not in expected else expected
        choice = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", detail)
        if choice:  # an enumerated option: the choices and the nearest, as check_choice says it
            options = re.findall(r"'([^']*)'", choice[1])
            hint = did_you_mean(choice[2], options)
            detail = f"'{choice[2]}' is not one of {', '.join(options)}" + (f"; {hint}" if hint else "")
        return f"{'.init_args.'.join(keys)}: {detail}"
    return " ".join(message.split())
