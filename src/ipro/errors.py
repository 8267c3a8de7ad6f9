"""User-facing errors.

An `IproError` carries one line that names the file or field, says what is wrong and
what to do. The CLI prints it without a traceback and exits with status 2.
"""


class IproError(ValueError):
    """A problem with the user's input, files or configuration (not a bug in ipro)."""


def read_format_json(file, fmt: str, what: str, fix: str) -> dict:
    """A JSON file ipro wrote, tagged {"format": fmt}; `what` names the kind of file and
    `fix` says how to remake it, in the one-line errors for a bad file."""
    import json

    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise IproError(f"{file}: not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise IproError(f"{file}: not {what} (format {data.get('format') if isinstance(data, dict) else None!r}); {fix}")
    return data
