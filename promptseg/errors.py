"""Exceptions a user can act on; each message says what was wrong and what to do."""

from __future__ import annotations


class PromptsegError(Exception):
    """Base class of promptseg's own errors."""


class UnsupportedPromptError(PromptsegError, TypeError):
    """The model cannot take this kind of prompt; the message names models that can."""


class WeightsNotFoundError(PromptsegError, FileNotFoundError):
    """A weight file is neither given, cached nor downloadable; the message says where to put it."""


class ChecksumError(PromptsegError, ValueError):
    """A file's sha256 differs from the one recorded in zoo.yaml."""


class CheckpointFormatError(PromptsegError, ValueError):
    """A checkpoint has an unknown layout, or missing / unexpected / wrongly shaped keys."""


class UnknownModelError(PromptsegError, KeyError):
    """No architecture or tag of that name; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetLayoutError(PromptsegError, FileNotFoundError):
    """A dataset folder lacks files or has malformed ones; the message lists what was expected."""


class IncompatibleComponentsError(PromptsegError, ValueError):
    """A backbone does not provide the features a head needs; the message names both contracts."""
