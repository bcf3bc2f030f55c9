"""Ctrl-C that is not lost on the way.

Python raises KeyboardInterrupt in whatever code the main thread runs when
SIGINT arrives. Two places can lose it: a finaliser (`__del__`, a weakref
callback the garbage collector runs), where Python prints "Exception ignored"
and goes on, and a library that turns it into an ordinary exception and
recovers (torch.onnx.export tries its next capture strategy on any error of
the one before). A command then runs to its end after the user pressed Ctrl-C.

So the CLI's handler also records the press, long loops call
`raise_if_interrupted()` between units of work (a graph, a denoising step, a
video), and a press raised inside a finaliser is not printed: the next
checkpoint raises it again. Outside the CLI nothing is installed and the
checkpoints never raise.

Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_pressed = False


def _on_sigint(signum, frame):
    global _pressed
    _pressed = True
    raise KeyboardInterrupt


def _quiet_about_interrupts(default_hook):
    def hook(unraisable):
        global _pressed
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _pressed = True  # (already, when the handler raised it) the next checkpoint raises it
            return
        default_hook(unraisable)

    return hook


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since `catch_interrupts` began."""
    if _pressed:
        raise KeyboardInterrupt


@contextlib.contextmanager
def catch_interrupts():
    """Within the block, Ctrl-C is recorded as well as raised (see the module's doc).

    Does nothing off the main thread or when SIGINT is not Python's default
    handler (ignored by the parent, or a caller's own handler).
    """
    global _pressed
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _pressed = False
    old_hook = sys.unraisablehook
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_about_interrupts(old_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = old_hook
        _pressed = False
