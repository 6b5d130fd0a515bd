"""The error nlbfab raises for anything a user can fix."""


class UserError(Exception):
    """Bad input or a missing file: the message is one line that says what to do.

    Commands print it without a traceback and exit with status 2.
    """
