"""Errors a user can act on. The CLI prints their message (no traceback) and exits with exit_code."""


class TunesmithError(Exception):
    exit_code = 1


class UsageError(TunesmithError):
    """Bad arguments or configuration."""

    exit_code = 2
