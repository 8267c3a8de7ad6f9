"""User-facing errors.

An `IproError` carries one line that names the file or field, says what is wrong and
what to do. The CLI prints it without a traceback and exits with status 2.
"""


class IproError(ValueError):
    """A problem with the user's input, files or configuration (not a bug in ipro)."""
