"""Renaming checkpoint keys with `SAVED=MODEL` maps: one `*` on each side carries what it matched over.

Shared by the trainer's `--init-map` (warm start) and the evaluator's `--restore-map` and `--ema-map`
(checkpoints written by other training loops).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from common.errors import UsageError

KeyMap = tuple[str, str]  # (SAVED, MODEL) patterns


def parse_map(text: str, flag: str) -> KeyMap:
    """`SAVED=MODEL` -> (SAVED, MODEL).

    Raises:
      UsageError: no `=`, an empty side, or a `*` count other than zero or one on each side.
    """
    old, sep, new = text.partition("=")
    if not sep or not old or not new or old.count("*") != new.count("*") or old.count("*") > 1:
        raise UsageError(f"{flag} {text!r}: expected OLD=NEW with at most one '*' on each side")
    return old, new


def pattern(text: str) -> re.Pattern[str]:
    """The regular expression of a map's side: its one `*` matches anything, and is captured."""
    return re.compile("^" + "(.*)".join(re.escape(part) for part in text.split("*", 1)) + "$")


def map_keys(maps: Iterable[KeyMap], saved: Collection[str], targets: Collection[str], flag: str) -> dict[str, str]:
    """What the maps assign: target key -> saved key.

    Raises:
      UsageError: a map that matches no saved key, or that sends one to a key the targets lack.
    """
    assign: dict[str, str] = {}
    for old_text, new_text in maps:
        old_re = pattern(old_text)
        matched = [k for k in saved if old_re.match(k)]
        if not matched:
            raise UsageError(f"{flag} {old_text}={new_text}: matches no saved variable "
                             f"(saved: {', '.join(sorted(saved))})")
        for old in matched:
            star = old_re.match(old)
            new = new_text.replace("*", star.group(1) if star and star.groups() else "", 1)
            if new not in targets:
                raise UsageError(f"{flag} {old_text}={new_text}: {old} would go to {new}, which the model lacks")
            assign[new] = old
    return assign
