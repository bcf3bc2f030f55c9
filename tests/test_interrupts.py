"""Ctrl-C is not lost when it lands in a finaliser or a library that recovers from errors.

Each test presses Ctrl-C for real (SIGINT to this process) at a place where
plain Python loses it, and checks that the checkpoint raises it again.
"""

import gc
import os
import signal
import sys

import pytest

from tempomaster.interrupts import catch_interrupts, raise_if_interrupted


def _press_ctrl_c_and_let_the_handler_run():
    os.kill(os.getpid(), signal.SIGINT)
    total = 0
    for i in range(10_000):  # the handler runs at a bytecode boundary of this loop
        total += i
    return total


class _PressesInItsFinaliser:
    def __del__(self):
        _press_ctrl_c_and_let_the_handler_run()


def _swallow_in_a_finaliser():
    obj = _PressesInItsFinaliser()
    del obj  # KeyboardInterrupt raised inside __del__: Python reports it as unraisable and goes on
    gc.collect()


def _swallow_in_a_library():
    try:
        _press_ctrl_c_and_let_the_handler_run()
    except KeyboardInterrupt as err:  # e.g. torch.onnx.export's next capture strategy after any error
        try:
            raise RuntimeError("capture failed") from err
        except Exception:
            pass


@pytest.fixture(autouse=True)
def python_s_own_sigint_handler():
    """Every test starts from Python's default SIGINT handler, whatever the suite was launched with
    (a background job starts with SIGINT ignored, which catch_interrupts leaves alone by design)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture()
def unraisable(monkeypatch):
    """What Python would print as "Exception ignored in ...", recorded instead."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    return seen


def test_plain_python_loses_a_press_inside_a_finaliser(unraisable):
    # The fault the module exists for: without catch_interrupts the press is only reported.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _swallow_in_a_finaliser()
    assert unraisable == [KeyboardInterrupt]
    raise_if_interrupted()  # nothing recorded outside the CLI: does not raise


@pytest.mark.parametrize("swallow", [_swallow_in_a_finaliser, _swallow_in_a_library], ids=["finaliser", "library"])
def test_a_swallowed_press_is_raised_at_the_next_checkpoint(swallow, unraisable):
    with catch_interrupts():
        swallow()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert unraisable == []  # recorded, not reported as "Exception ignored"


def test_other_unraisable_errors_are_still_reported(unraisable):
    class Fails:
        def __del__(self):
            raise ValueError("from a finaliser")

    with catch_interrupts():
        obj = Fails()
        del obj
    assert unraisable == [ValueError]


def test_the_block_restores_python_s_handler_and_forgets_the_press():
    old_hook = sys.unraisablehook
    with pytest.raises(KeyboardInterrupt):
        with catch_interrupts():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            _press_ctrl_c_and_let_the_handler_run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert sys.unraisablehook is old_hook
    raise_if_interrupted()  # the press belonged to the finished block


def test_an_ignored_sigint_stays_ignored():
    # a background job's SIGINT is ignored on purpose; the block must not turn it back on
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with catch_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_an_export_whose_press_was_swallowed_stops_and_keeps_nothing(tmp_path, monkeypatch):
    from export_helpers import micro_models, micro_shape

    from tempomaster.export import build as build_mod

    real = build_mod.export_graph

    exported = []

    def export_then_lose_a_press(spec, *a, **k):
        exported.append(spec.name)
        record = real(spec, *a, **k)
        _swallow_in_a_finaliser()
        return record

    monkeypatch.setattr(build_mod, "export_graph", export_then_lose_a_press)
    with catch_interrupts(), pytest.raises(KeyboardInterrupt):
        build_mod.export_onnx(
            micro_models(), "fp32", micro_shape(), tmp_path / "b", graphs=["t5", "dit"], progress=False
        )
    assert len(exported) == 1  # stopped before the second graph
    assert list(tmp_path.iterdir()) == []  # no build, no staging


def test_a_keyboard_interrupt_a_finaliser_raises_itself_is_recorded_too(unraisable):
    class RaisesIt:
        def __del__(self):
            raise KeyboardInterrupt  # not through the handler: only the unraisable hook sees it

    with catch_interrupts():
        obj = RaisesIt()
        del obj
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
    assert unraisable == []
