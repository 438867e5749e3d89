"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (argument, file, index). The message names what and where."""

    exit_code = 2


class IndexFormatError(UserError):
    """An index directory that is missing files, truncated, or of another format version."""
