"""The one exception type that the command line turns into a one-line error and exit code 2, and the warning
it prints as one line."""


class UserError(Exception):
    """Bad input from the user: wrong shapes, bad paths, impossible parameters, corrupt files."""


class PerformanceWarning(UserWarning):
    """A setting that works but runs much slower on this machine than another would (the CLI: 'rrcm: warning: ...')."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
