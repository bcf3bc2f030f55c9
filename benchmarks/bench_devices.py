"""Wall time of one tiny-preset video on 1, 2, 4 CPU processes (gloo), and the one-process run.

    python benchmarks/bench_devices.py [--devices 1,2,4] [--repeats 2] [--steps 6,4,4]

Each process runs one intra-op thread (OMP_NUM_THREADS=1), so N processes need
N cores to overlap.  "launch" is the whole call (spawning, importing torch,
building the models, generating); "generate" is rank 0's time inside
``generate``.  The frames of every run are compared with the one-process run.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tempomaster.models.presets import get_preset  # noqa: E402
from tempomaster.models.tiny import build_tiny_models  # noqa: E402
from tempomaster.runtime.backends.factory import TorchBackendFactory  # noqa: E402
from tempomaster.runtime.backends.torch import TorchBackend  # noqa: E402
from tempomaster.runtime.pipeline import GenerationRequest, generate  # noqa: E402
from tempomaster.runtime.workers import VideoJob, launch, run_videos  # noqa: E402


def _frames(world, jobs):
    return [
        (i, rep.seconds, [s.frames.numpy() for s in res.stages])
        for i, (rep, res, _) in run_videos(
            world, jobs, TorchBackendFactory(preset="tiny"), write=False, keep_frames=True
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", default="6,4,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = get_preset("tiny").defaults
    request = GenerationRequest(
        prompt="a red ball bouncing",
        height=d.height,
        width=d.width,
        num_frames=d.num_frames,
        frame_intervals=d.frame_intervals,
        steps_per_stage=tuple(int(s) for s in args.steps.split(",")),
        shift_per_stage=d.shift_per_stage,
        guidance_scale=d.guidance_scale,
        seed=0,
    )
    models = build_tiny_models()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = generate(TorchBackend(models), models.tokenizer, request, progress=False)
        times.append(time.perf_counter() - start)
    reference = [s.frames.numpy() for s in result.stages]
    print(
        f"tiny {d.width}x{d.height}, {d.num_frames} frames, steps {args.steps}; one thread per process; {os.cpu_count()} cores"
    )
    print(f"in-process generate: {min(times):.2f} s (best of {args.repeats})")
    jobs = [VideoJob("v", request, Path("unused.mp4"))]
    for n in (int(x) for x in args.devices.split(",")):
        walls, gens = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            per_rank = launch(_frames, (jobs,), devices=[torch.device("cpu")] * n, timeout=300)
            walls.append(time.perf_counter() - start)
            _, seconds, frames = next(item for items in per_rank for item in items)
            gens.append(seconds)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(frames, reference))
        print(
            f"{n} process(es): launch {min(walls):.2f} s, generate on rank 0 {min(gens):.2f} s "
            f"(best of {args.repeats}), max |frame - one-process| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
