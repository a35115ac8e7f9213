"""Typed exceptions for adaloc. Messages name the bad value, what was expected, what to do."""

from __future__ import annotations


class AdalocError(Exception):
    """Base class of every error adaloc raises on purpose."""


class ConfigError(AdalocError, ValueError):
    """A spec, config or argument has a value outside what is accepted."""


class DatasetError(AdalocError):
    """A dataset name, root or folder layout cannot be used."""


class ModelError(AdalocError, ValueError):
    """An unknown model builder or a model/input combination that cannot work."""


class KeyFormatError(AdalocError):
    """A key or base artifact is corrupted, truncated or of an unknown format."""


class KeyMismatchError(AdalocError):
    """A key does not fit the base it is applied to (other base, wrong shapes)."""


class TokenError(AdalocError, ValueError):
    """A token (M-LOCK input stamp) is invalid for the images it is applied to."""
