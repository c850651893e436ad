"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations


class CovspecError(Exception):
    """Base class for errors caused by user input (files, config values, arguments)."""


class ConfigError(CovspecError):
    """An invalid configuration key or value; the message names the dotted key."""


class InputError(CovspecError):
    """A bad input file or argument (image, question, checkpoint path)."""
