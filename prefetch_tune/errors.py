"""One root exception; each subclass carries the exit code the CLI turns it into.

0 success, 1 a run failed (server, benchmark, regression), 2 bad input (config, flags, files).
"""

from __future__ import annotations


class PrefetchTuneError(Exception):
    """Root of every error prefetch-tune raises on purpose."""

    exit_code = 1


class ConfigError(PrefetchTuneError):
    """Bad input: a key, flag, value or path. The message names it in one line."""

    exit_code = 2


class BackendError(PrefetchTuneError):
    """A backend could not produce a measurement (server, process, benchmark).

    `failure_class` is a machine-readable tag (see `prefetch_tune.backends.server.FailureClass`)
    so a search can tell an infeasible config (out of memory) from a flaky run; None if unknown.
    """

    failure_class: str | None = None

    def __init__(self, message: str = "", *, failure_class: str | None = None) -> None:
        super().__init__(message)
        if failure_class is not None:
            self.failure_class = failure_class


class ServerStartupError(BackendError):
    """The server did not become ready: crashed, timed out or ran out of memory."""


class BenchmarkError(BackendError):
    """The benchmark client failed or its result was missing, unreadable or incomplete."""
