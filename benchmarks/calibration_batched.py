"""Batched calibration: several prompts' DiT calls as one batch of chunks. Faster, and the same amax?

A calibration runs its videos one after another; each DiT call is the
video's chunks, cond and uncond. Every video of a calibration has the same
shape and schedule, so the videos can also advance in lockstep: all of them
at stage s, step i together, their DiT inputs concatenated along the batch
(one timestep for all, as the DiT graph takes), one DiT call, the velocity
split back. Here each video is a thread whose backend hands its DiT call to
a shared `LockstepDiT`, which makes the call once every unfinished video has
handed in its own; text encoding and the VAE stay per video. The amax
recorder's hooks see the batched call, whose abs-max is the max of the
videos' own.

Measured on the tiny preset at its default shape with the default
calibration set (4 prompts, a quarter of the steps) and 8 prompts: wall and
CPU seconds of the sequential and the batched run (the same recorder, the
same requests), and the largest relative amax difference between them over
every Linear input and attention tensor; and the seconds spent in DiT calls
(the only part batching can shorten).

    python -m benchmarks.calibration_batched [--preset tiny] [--prompts 4,8]
        [--out benchmarks/results/calibration_batched_tiny.json]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json


class TimedDiT:
    """The backend's DiT call, with the seconds spent in it summed (thread-safe: calls may come from any thread)."""

    def __init__(self, backend):
        self.backend = backend
        self.seconds = 0.0
        self.lock = threading.Lock()

    def velocity(self, *inputs):
        t0 = time.perf_counter()
        out = self.backend.velocity(*inputs)
        with self.lock:
            self.seconds += time.perf_counter() - t0
        return out


class LockstepDiT:
    """One DiT call for the DiT calls of `videos` generations that reach the same step together."""

    def __init__(self, backend, videos: int):
        self.backend = backend
        self.active = videos
        self.cond = threading.Condition()
        self.waiting: list[list] = []  # [inputs, result] per video at this step
        self.calls = 0

    def _run(self) -> None:
        batch, self.waiting = self.waiting, []
        try:
            steps = {float(entry[0][2].reshape(-1)[0]) for entry in batch}
            if len(steps) != 1:
                raise RuntimeError(f"lockstep videos at different timesteps {sorted(steps)}: their schedules differ")
            inputs = [entry[0] for entry in batch]
            merged = [torch.cat([inp[j] for inp in inputs]) for j in (0, 1)]
            merged += [inputs[0][2]] + [torch.cat([inp[j] for inp in inputs]) for j in (3, 4, 5)]
            out = self.backend.velocity(*merged)
            self.calls += 1
            for entry, part in zip(batch, out.split([inp[0].shape[0] for inp in inputs])):
                entry[1] = part
        except Exception as err:  # every video of the batch raises it, not only the one that ran the call
            for entry in batch:
                entry[1] = err
        finally:
            self.cond.notify_all()

    def velocity(self, *inputs):
        entry = [inputs, None]
        with self.cond:
            self.waiting.append(entry)
            if len(self.waiting) == self.active:
                self._run()
            while entry[1] is None:
                self.cond.wait()
        if isinstance(entry[1], Exception):
            raise entry[1]
        return entry[1]

    def finished(self) -> None:
        """A video is done: the others no longer wait for it."""
        with self.cond:
            self.active -= 1
            if self.waiting and len(self.waiting) == self.active:
                self._run()


def sequential(models, backend, requests, num_stages):
    from tempomaster.calibration.collect import AmaxRecorder
    from tempomaster.calibration.trajectory import VelocityOverride
    from tempomaster.runtime.pipeline import generate

    recorder = AmaxRecorder(backend.dit, num_stages)
    dit = TimedDiT(backend)
    try:
        for request in requests:
            generate(
                VelocityOverride(backend, dit.velocity),
                models.tokenizer,
                request,
                progress=False,
                keep_stages=False,
                on_step_end=recorder.on_step_end,
            )
    finally:
        recorder.remove()
    return recorder, None, dit.seconds


def batched(models, backend, requests, num_stages):
    from tempomaster.calibration.collect import AmaxRecorder
    from tempomaster.calibration.trajectory import VelocityOverride
    from tempomaster.runtime.pipeline import generate

    recorder = AmaxRecorder(backend.dit, num_stages)
    dit = TimedDiT(backend)
    lockstep = LockstepDiT(dit, len(requests))
    lock = threading.Lock()
    errors = []

    def on_step_end(event):
        with lock:  # the first video past a batched call credits its maxima to the stage they all are in
            recorder.on_step_end(event)

    def run(request):
        try:
            generate(
                VelocityOverride(backend, lockstep.velocity),
                models.tokenizer,
                request,
                progress=False,
                keep_stages=False,
                on_step_end=on_step_end,
            )
        except BaseException as err:  # reported after the join
            errors.append(err)
        finally:
            lockstep.finished()

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        recorder.remove()
    if errors:
        raise errors[0]
    return recorder, lockstep.calls, dit.seconds


def flat_amax(recorder) -> dict[str, float]:
    out = {n: max(row) for n, row in recorder.amax.items()}
    for name, rows in recorder.attention_amax.items():
        for which, row in rows.items():
            out[f"{name}:{which}"] = max(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompts", default="4,8", help="comma-separated numbers of calibration prompts")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out_path = args.out or Path(f"benchmarks/results/calibration_batched_{args.preset}.json")

    from tempomaster.calibration.collect import resolve_calib_set, resolve_prompts, resolve_steps
    from tempomaster.calibration.trajectory import make_request
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.runtime.backends.torch import TorchBackend

    torch.set_num_threads(1)
    models = load_model_set(args.preset, None, None, torch.float32)
    shape = ExportShape.from_preset(models.preset)
    num_stages = len(shape.intervals)
    _, spec = resolve_calib_set("small")
    steps = resolve_steps(None, models.preset, num_stages, spec.step_fraction)
    backend = TorchBackend(models, dtype=torch.float32)
    runs = []
    for count in (int(c) for c in args.prompts.split(",")):
        prompts, _ = resolve_prompts(None, count)
        requests = [make_request(pr, shape, models.preset, steps, i) for i, pr in enumerate(prompts)]
        figures = {"prompts": count, "steps_per_stage": list(steps)}
        amax = {}
        for name, fn in (("sequential", sequential), ("batched", batched)):
            c0, t0 = time.process_time(), time.perf_counter()
            recorder, calls, dit_seconds = fn(models, backend, requests, num_stages)
            figures[name] = {
                "wall_s": round(time.perf_counter() - t0, 2),
                "cpu_s": round(time.process_time() - c0, 2),
                "dit_s": round(dit_seconds, 2),
                **({"batched_dit_calls": calls} if calls is not None else {}),
            }
            amax[name] = flat_amax(recorder)
        diffs = {
            n: abs(amax["batched"][n] - amax["sequential"][n]) / max(amax["sequential"][n], 1e-30)
            for n in amax["sequential"]
        }
        worst = max(diffs, key=diffs.get)
        figures["amax_max_rel_diff"] = diffs[worst]
        figures["amax_max_rel_diff_at"] = worst
        figures["amax_equal"] = sum(1 for d in diffs.values() if d == 0)
        figures["amax_tensors"] = len(diffs)
        figures["speedup_wall"] = round(figures["sequential"]["wall_s"] / figures["batched"]["wall_s"], 3)
        figures["speedup_cpu"] = round(figures["sequential"]["cpu_s"] / figures["batched"]["cpu_s"], 3)
        print(figures, flush=True)
        runs.append(figures)
    write_json(
        {
            "note": __doc__.split("\n\n")[1].replace("\n", " "),
            "preset": args.preset,
            "shape": {"height": shape.height, "width": shape.width, "num_frames": shape.num_frames},
            "torch_threads": 1,
            "runs": runs,
        },
        out_path,
    )
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
