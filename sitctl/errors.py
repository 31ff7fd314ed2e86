"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Anything else (a bug) is left to raise with its traceback.
"""


class SitctlError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class ArtifactError(SitctlError):
    """An artifact is missing, of the wrong kind, of a newer schema, incomplete or tampered."""


class CheckpointMismatchError(SitctlError):
    """A state dict does not fit the model it is loaded into."""
