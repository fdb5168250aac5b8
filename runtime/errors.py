"""The one user-facing exception type, the one rule for settings out of range, and the one for naming a row."""

import re
from typing import Any


class HuseError(Exception):
    """A problem the user can act on: the message says what was asked, what was found and what to do.

    The CLI prints it as one line and exits with code 1, without a traceback.
    """


def check_ranges(config: Any, floors: dict[str, tuple[float, bool]]) -> None:
    """HuseError naming the first setting below its floor, as the command's flag and the config field.

    Args:
        floors: field -> (floor, whether the floor itself is allowed). A field that is None (a default
            to be chosen) or a string ("auto") is not checked.
    """
    for name, (low, allowed) in floors.items():
        value = getattr(config, name)
        if value is None or isinstance(value, str) or value > low or (value == low and allowed):
            continue
        raise HuseError(f"--{name.replace('_', '-')} ({name}) must be {'at least' if allowed else 'more than'} {low:g}; "
                        f"got {value:g}")


def row_error(row: int, msg: str) -> str:
    """Name the catalog row, never the index inside a model call ("item 3 has no ..." -> "row 1500 has no ...")."""
    if msg.startswith("row "):
        return msg
    m = re.match(r"item \d+(: | )", msg)
    if m:
        return f"row {row}{m.group(1)}{msg[m.end():]}"
    return f"row {row}: {msg}"
