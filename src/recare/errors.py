"""The one exception type recare raises for bad user input."""


class RecareError(Exception):
    """Bad input or state that the user can fix; the CLI prints it without a traceback."""
