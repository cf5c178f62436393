"""Errors of our own, each with a message that tells the user what to do next.

The CLI prints ``str(error)`` on one line and exits with status 2; no traceback.
"""


class TracInError(Exception):
    """Base class: anything the user can fix by changing their input."""


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
