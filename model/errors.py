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


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, else its type's name: what a one-line warning or error quotes.

    Library messages (HDF5, huggingface_hub, W&B) run over several lines: a timestamp, a URL, a hint.
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
