"""User-facing errors.

Anything a user can fix (a bad parameter file, an unknown model, an unreachable
server) raises :class:`AloeError`; the CLI prints its message and exits non-zero
without a traceback. Programming errors stay ordinary exceptions.
"""


class AloeError(Exception):
    """An error the user can fix; its message says what is wrong and where."""


class ConfigError(AloeError):
    """A parameter file or config value is invalid."""


class BackendError(AloeError):
    """A backend could not be reached or refused a request for good."""


class Unreachable(BackendError):
    """Every request of a call failed to get any answer (refused connections, timeouts, 5xx to the
    end): an outage, not one bad request."""


class StageFailed(AloeError):
    """A stage's notebook failed while running (the CLI exits 1, not 2: the parameters were fine)."""
