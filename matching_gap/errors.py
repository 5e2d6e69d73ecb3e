"""Errors a user can fix. ``python -m matching_gap.main`` prints their message alone (no
traceback) and exits with status 2; everything else is a bug and keeps its traceback.

Each class also derives from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``), so library users can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A config value or combination that cannot run (checked before anything is written)."""


class DataError(UserError, ValueError):
    """The data cannot be read or does not fit the config."""


class DataNotFoundError(UserError, FileNotFoundError):
    """The requested data is not on this machine; the message says how to get it."""


class WorkdirError(UserError, ValueError):
    """The workdir holds a run that this command cannot continue or read."""
