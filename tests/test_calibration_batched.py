"""benchmarks/calibration_batched.py's lockstep DiT: every video gets its own velocity back from one batched call."""

import threading

import torch

from benchmarks.calibration_batched import LockstepDiT


class _FakeBackend:
    """velocity = 3 x - y[:, :1] + t + the mean of the context: per batch row, so a mixed-up split shows."""

    def __init__(self):
        self.batches = []

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        self.batches.append(x.shape[0])
        return 3 * x - y[:, :1] + timestep + context.mean(dim=(1, 2))[:, None, None]


def _inputs(g, batch, t):
    return (
        torch.randn(batch, 2, 3, generator=g),
        torch.randn(batch, 4, 3, generator=g),
        torch.tensor([t]),
        torch.randn(batch, 5, 6, generator=g),
        torch.randn(batch, 7, 2, generator=g),
        torch.randn(batch, 7, 2, generator=g),
    )


def test_lockstep_batches_and_splits_back():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    sizes = (2, 4, 2)  # videos with different chunk counts (cond + uncond each)
    steps = [[_inputs(g, b, 10.0 * s) for b in sizes] for s in range(3)]
    # the last video stops after two steps: the others go on without waiting for it
    backend = _FakeBackend()
    lockstep = LockstepDiT(backend, len(sizes))
    got = {v: [] for v in range(len(sizes))}

    def video(v):
        try:
            for s, per_video in enumerate(steps):
                if v == 2 and s == 2:
                    break
                got[v].append(lockstep.velocity(*per_video[v]))
        finally:
            lockstep.finished()

    threads = [threading.Thread(target=video, args=(v,)) for v in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert backend.batches == [8, 8, 6] and lockstep.calls == 3
    for v in range(len(sizes)):
        for s, out in enumerate(got[v]):
            want = _FakeBackend().velocity(*steps[s][v])
            assert torch.equal(out, want), (v, s)
    assert len(got[2]) == 2


def test_lockstep_refuses_different_timesteps():
    """Videos whose schedules differ cannot share a call: each of them gets the one-line error."""
    g = torch.Generator().manual_seed(0)
    lockstep = LockstepDiT(_FakeBackend(), 2)
    errors = []

    def video(t):
        try:
            lockstep.velocity(*_inputs(g, 2, t))
        except RuntimeError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=video, args=(t,)) for t in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == ["lockstep videos at different timesteps [1.0, 2.0]: their schedules differ"] * 2
