"""The error hierarchy.

`AttnserveError` and its subclasses are mistakes a user can make or fix (an unknown
model name, a checkpoint that does not fit, an input of the wrong shape). The CLI turns
them into one sentence and a non-zero exit. `InternalError` is a bug in attnserve; it
keeps its traceback.
"""


class AttnserveError(Exception):
    """A problem the user can fix; the message says what was expected, what was found
    and what to do."""


class UnknownModelError(AttnserveError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownConfigError(UnknownModelError):
    pass


class CheckpointError(AttnserveError):
    """A checkpoint file that cannot be read, is not a state dict, or does not fit."""


class InputError(AttnserveError, ValueError):
    """Inputs to a runner or a model with the wrong names, shapes or dtypes."""


class ParityError(AttnserveError):
    """An exported model whose outputs differ from the eager model beyond tolerance."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ExportError(AttnserveError):
    """The exporter could not produce a valid ONNX model."""


class BackendUnavailableError(AttnserveError):
    """A backend whose library or device is not present on this machine."""


class InternalError(Exception):
    """A bug in attnserve, not in the user's input."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (libraries' messages run long)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
