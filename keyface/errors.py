"""Errors a user can act on.

Every error raised on purpose by this library derives from :class:`KeyFaceError`. Its message names the
input that is wrong (a file, an argument, a node input) and says what to do about it, so that the CLI and
the ComfyUI nodes can show it as is, without a traceback from deep inside torch.

A message about one input starts with the library's name of that input (``num_steps must be ...``); each front
end words it its own way with :meth:`KeyFaceError.naming`: the CLI calls ``num_steps`` ``--steps``, the Keyframe
Sampler node ``steps``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_LEADING_NAME = re.compile(r"[A-Za-z_]\w*(?=[\s:=]|$)")


class KeyFaceError(Exception):
    """Base class: a problem with the user's input, files or settings, explained in the message.

    ``input_name``: the library's name of the input at fault (a :class:`~keyface.pipeline.GenerationSettings`
    field, an argument); by default the word the message starts with.
    """

    def __init__(self, message: str = "", *, input_name: str | None = None):
        super().__init__(message)
        self._input_name = input_name

    @property
    def input_name(self) -> str | None:
        explicit = getattr(self, "_input_name", None)
        if explicit is not None:
            return explicit
        match = _LEADING_NAME.match(str(self))
        return match.group(0) if match else None

    def with_message(self, message: str) -> KeyFaceError:
        """The same kind of error, about the same input, worded as ``message`` (for a front end)."""
        error = type(self).__new__(type(self))
        error.__dict__.update(self.__dict__)
        error.args = (message,)
        error._input_name = self.input_name
        return error

    def naming(self, labels: Mapping[str, str]) -> KeyFaceError:
        """This error with its input called by the front end's name: ``labels`` maps library names to the front
        end's (the CLI: ``{"num_steps": "--steps"}``, a node: ``{"num_steps": "steps"}``). Unchanged when the
        input has no label there."""
        name = self.input_name
        label = labels.get(name) if name else None
        message = str(self)
        if label is None or not message.startswith(name):
            return self
        renamed = self.with_message(label + message[len(name) :])
        renamed._input_name = label
        return renamed


def brief(error: BaseException, limit: int = 400) -> str:
    """Another library's exception text cut for a KeyFace message (which is one or two lines): its first two
    lines and how many more there were, at most ``limit`` characters (torch's ``load_state_dict`` lists every
    mismatched tensor)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:2]) + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return text if len(text) <= limit else text[: limit - 4].rstrip() + " ..."


class InputError(KeyFaceError, ValueError):
    """An argument, file content or setting is invalid (names the input and the accepted values)."""


class MissingWeightsError(KeyFaceError, FileNotFoundError):
    """A weight file is missing: names the file, where it was looked for and where it comes from."""


class CheckpointError(KeyFaceError):
    """A weight file exists but cannot be used (wrong format, truncated, other stage, size mismatch)."""


class Interrupted(KeyFaceError):
    """The user (or the host application) asked a long job to stop; finished work is kept on disk."""
