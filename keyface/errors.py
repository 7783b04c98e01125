"""Errors a user can act on.

Every error raised on purpose by this library derives from :class:`KeyFaceError`. Its message names the
input that is wrong (a file, an argument, a node input) and says what to do about it, so that the CLI and
the ComfyUI nodes can show it as is, without a traceback from deep inside torch.
"""


class KeyFaceError(Exception):
    """Base class: a problem with the user's input, files or settings, explained in the message."""


class InputError(KeyFaceError, ValueError):
    """An argument, file content or setting is invalid (names the input and the accepted values)."""


class MissingWeightsError(KeyFaceError, FileNotFoundError):
    """A weight file is missing: names the file, where it was looked for and where it comes from."""


class CheckpointError(KeyFaceError):
    """A weight file exists but cannot be used (wrong format, truncated, other stage, size mismatch)."""


class Interrupted(KeyFaceError):
    """The user (or the host application) asked a long job to stop; finished work is kept on disk."""
