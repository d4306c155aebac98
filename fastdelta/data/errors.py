"""Error type for problems with user-supplied data."""


class DataError(ValueError):
    """Raised when input data is missing, malformed or inconsistent.

    Subclasses ValueError so callers that already catch ValueError for bad
    arguments keep working; the message always names the offending path or
    parameter so the user can fix it without reading the code.
    """
