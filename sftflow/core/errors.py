"""Errors that the CLI prints as one line (what failed and where) instead of a traceback."""


class SftflowError(Exception):
    """A failure with a message fit for a user: what went wrong and where to look."""


class ConfigError(SftflowError):
    """A missing or invalid setting."""


class ServiceUnavailable(SftflowError):
    """A service that could not be reached or answered unhealthy."""
