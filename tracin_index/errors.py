"""Errors of our own, each with a message that tells the user what to do next.

The CLI prints ``str(error)`` on one line, no traceback, and exits with the error's :attr:`~TracInError.exit_code`:
2 for bad input (the user changes the command or a file), 1 for a failure of the machine or the cluster
(:class:`MachineError`: a full disk, a worker that died), where the same command may well work later.
Anything else is a bug: the CLI shows its traceback and where to report it.
"""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a one-line message, cut at ``limit`` characters: a label or a value read from a file
    may be a megabyte long (or nested too deep to print at all)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deep to print"
    if "\n" in text:  # a tensor's or an array's repr (a string's escapes its line breaks)
        text = " ".join(line.strip() for line in text.splitlines())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class TracInError(Exception):
    """Base class: anything the user can fix by changing their input (exit status 2)."""

    exit_code = 2


class InputError(TracInError):
    """A file is missing, unreadable or malformed (the message names file and line)."""


class LabelError(TracInError):
    """A head, relation or tail label is not in the id maps (the message suggests close matches)."""


class ModelLoadError(TracInError):
    """A model, run directory or checkpoint cannot be loaded or does not fit the model."""


class PickleRefusedError(ModelLoadError):
    """Loading would unpickle arbitrary objects, and the user did not allow it."""


class SelectionError(TracInError):
    """The parameter selection names layers that do not exist or selects nothing."""


class LossError(TracInError):
    """The requested loss cannot be computed for this model and parameter selection."""


class VanishingGradientError(TracInError):
    """The loss gradients vanish (zero or subnormal), so every influence would be 0."""


class TracInWarning(UserWarning):
    """Something was assumed, or looks wrong, that the user may want to know about (e.g. a missing learning rate)."""


class MachineError(TracInError):
    """The machine or the cluster failed, not the input: a write that failed, a worker that died (exit status 1)."""

    exit_code = 1


class DiskFullError(MachineError):
    """A file could not be written because its file system is full (or the user's quota is spent).

    ``path``: the file; ``free``: the bytes free on its file system after the partial file was removed."""

    def __init__(self, message: str, path: str, free: int):
        super().__init__(message)
        self.path, self.free = path, free

    def __reduce__(self):  # raised on a Dask worker, it is pickled back to the client
        return type(self), (str(self), self.path, self.free)
