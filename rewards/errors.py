"""Errors the user can fix: a config value, a file, a checkpoint. The message names the thing.

The CLI prints these as one line and exits 2; anything else is a bug or a run-time failure
and keeps its traceback (shown with ``-v``). They subclass the built-in type they replace,
so ``except ValueError`` / ``except FileNotFoundError`` in callers still holds.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: a problem with what the user gave, not with the program."""


class ConfigError(UserError, ValueError):
    """A bad value in a config, spec or command line: the message names the key."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UntrustedCheckpointError(ConfigError):
    """A checkpoint tried to choose code (an import path the user's own config does not name)."""
