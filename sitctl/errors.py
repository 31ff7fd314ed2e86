"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Anything else (a bug) is left to raise with its traceback.
"""


from model.errors import ArtifactError, CheckpointMismatchError, SitctlError, first_line  # noqa: F401 (re-exported: shared below all packages)




class BenchError(SitctlError):
    """A benchmark was asked for something it cannot measure."""


class SampleError(SitctlError):
    """Sampling settings or sources that cannot work."""


class EvalError(SitctlError):
    """Samples or settings that cannot give the requested metric."""


class ReferenceError(SitctlError):  # noqa: A001 (a reference artifact, not Python's weakref error)
    """A reference that cannot be read or does not fit the samples."""


class SweepError(SitctlError):
    """A sweep that cannot run as asked."""


class OtherRankStopped(SitctlError):
    """This rank stops because another rank of the job failed and says why; the CLI adds no line."""

    quiet = True
