"""The one user-facing exception type, and the one rule for settings out of range."""

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
