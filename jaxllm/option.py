"""Field metadata that makes an options dataclass its own command-line reference: help, choices, flag spellings.

`EngineConfig` (config.py) and the server's `ServerOptions` (serving/options.py) declare their fields with
`option(...)`; serving/cli.py turns every field into a flag, so a new option appears on the command line by itself.
"""

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Option:
    help: str | None = None
    choices: tuple | None = None
    type: Callable[[str], Any] | None = None  # parses the flag's text; None: the field's annotated type
    flags: tuple[str, ...] = ()  # other spellings of the flag, such as "-tp"
    aliases: tuple[str, ...] = ()  # old field names, still accepted as keywords and as flags
    group: str = "engine"  # the --help section
    nargs: str | None = None
    cli: bool = True  # False: a Python-only option, no flag


def option(default: Any, **metadata: Any) -> Any:
    """A dataclass field with `default` and the Option built from `metadata`."""
    return dataclasses.field(default=default, metadata={"option": Option(**metadata)})


def option_of(field: dataclasses.Field) -> Option:
    return field.metadata.get("option", Option())


def human_int(text: str) -> int:
    """4096, 4k, 32K, 1m: vLLM accepts these for --max-model-len (k = 1000, K = 1024)."""
    units = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 4096 or 4k, got {text!r}") from None
