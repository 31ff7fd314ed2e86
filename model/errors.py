"""Errors a user can cause, shared by model/, pipelines/ and sitctl/ (this module sits below all three).

The CLI prints a SitctlError as one `error:` line and exits 2; anything else is a bug and keeps
its traceback. Stage-specific subclasses live in sitctl/errors.py.
"""


class SitctlError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class ArtifactError(SitctlError):
    """An artifact is missing, of the wrong kind, of a newer schema, incomplete or tampered."""


class CheckpointMismatchError(SitctlError):
    """A state dict does not fit the model it is loaded into."""
