"""`module.path:function`: a user's own code named on the command line (`--model`, `--dataset`).

One definition of the form and of how it is imported, for every flag that takes one.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

from common.errors import UsageError

# `pkg.module:function`: dotted Python identifiers, a colon, one identifier.
_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


def is_reference(name: str) -> bool:
    """Whether `name` is an import path `module.path:function` rather than a registered name."""
    return bool(_REFERENCE.match(name))


def import_function(reference: str, flag: str = "--model") -> Any:
    """Import `module.path:function` from the current directory or PYTHONPATH.

    Raises:
      UsageError: not of that form, the module cannot be imported, or it has no such callable.
    """
    if not is_reference(reference):
        raise UsageError(f"{flag} {reference}: expected module.path:function")
    module_name, _, function_name = reference.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:  # `python -m` puts the cwd first; console scripts do not
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import can raise anything: ImportError, SyntaxError, the module's own errors
        raise UsageError(f"{flag} {reference}: cannot import {module_name} ({type(e).__name__}: {first_line(e)})"
                         ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"{flag} {reference}: {module_name} has no function {function_name}")
    return function


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or `no message`."""
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
