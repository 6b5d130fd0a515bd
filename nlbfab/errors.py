"""The error nlbfab raises for anything a user can fix."""


class UserError(Exception):
    """Bad input or a missing file: the message is one line that says what to do.

    Commands print it without a traceback and exit with status 2.
    """


def first_line(error: BaseException) -> str:
    """What a library's exception says, cut to one line for a ``UserError`` (its type's name
    where it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
