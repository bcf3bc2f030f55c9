"""The error types the command line turns into one-line messages.

Every layer may import this module (it imports nothing of the project). The CLI catches
``TempoMasterError`` and prints ``prog: error: message`` with the error's
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys


class TempoMasterError(Exception):
    """Base of every error the user can act on."""

    exit_code = 2


class UsageError(TempoMasterError, ValueError):
    """A bad flag, config value or request: nothing was loaded or computed."""


class CheckpointError(TempoMasterError, RuntimeError):
    """A checkpoint file that cannot be read or does not fit its model."""


class ManifestError(TempoMasterError, RuntimeError):
    """A build directory that cannot serve the request; the message says what differs."""


class ExportError(TempoMasterError, RuntimeError):
    """An export step failed; the message names the graph and the step."""

    exit_code = 1


class OpAuditError(ExportError):
    """A graph holds an op the TensorRT ONNX parser does not support."""


class MissingDependencyError(TempoMasterError, RuntimeError):
    """A step needs something this machine lacks (TensorRT, a GPU, onnxruntime).

    Exit code 3: the work done so far is kept, and the message says how to
    finish it elsewhere.
    """

    exit_code = 3


class OutputError(TempoMasterError, RuntimeError):
    """An output could not be written (a full disk, a quota, a failed encoder).

    Exit code 1: the temporary file was removed and the previous output, if
    any, is left as it was; the message names the output.
    """

    exit_code = 1


def print_to_stderr(line: str) -> None:
    """A note or warning for the user: on stderr, flushed, so stdout keeps only the command's result."""
    print(line, file=sys.stderr, flush=True)
