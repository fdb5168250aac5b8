"""The one user-facing exception type."""


class HuseError(Exception):
    """A problem the user can act on: the message says what was asked, what was found and what to do.

    The CLI prints it as one line and exits with code 1, without a traceback.
    """
