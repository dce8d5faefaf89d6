"""Errors that the CLI turns into one clear line and an exit code (exit codes: gensynth/cli.py)."""


class GensynthError(Exception):
    """A failure the user can act on; the message says what is wrong and what would be right."""

    exit_code = 1


class UsageError(GensynthError):
    """Bad command line, config key or value, or a named file that does not exist (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key or value that the schema does not allow (exit 2)."""


class InputDataError(GensynthError):
    """Input data that cannot be read as what it claims to be: a truncated IDX, a bad image (exit 1)."""


class StorageError(GensynthError):
    """A storage URL that cannot be read or written: dead endpoint, missing bucket, permissions (exit 1)."""
