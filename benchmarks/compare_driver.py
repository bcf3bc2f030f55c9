"""One side of `python -m benchmarks --compare`: time whole generations of the tiny preset in one process.

Run as a script with PYTHONPATH set to the tree under test; it uses only the
runtime's long-stable API (build_tiny_models, TorchBackend, GenerationRequest,
generate), so the same driver times the current tree and an older revision.
Prints one JSON line: where `tempomaster` was imported from and the seconds
of each timed generation (model building and one warm-up generation excluded).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--steps", default="6,4,4")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import tempomaster
    from tempomaster.models.tiny import build_tiny_models
    from tempomaster.runtime.backends.torch import TorchBackend
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    models = build_tiny_models()
    backend = TorchBackend(models)
    steps = tuple(int(s) for s in args.steps.split(","))
    request = GenerationRequest(
        prompt="a red ball bouncing on a striped background",
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        frame_intervals=(4, 2, 1)[-len(steps) :],
        steps_per_stage=steps,
        shift_per_stage=(5.0, 3.0, 3.0)[-len(steps) :],
        guidance_scale=5.0,
        seed=0,
    )
    generate(backend, models.tokenizer, request, progress=False)  # warm-up: allocator, oneDNN kernels
    seconds = []
    for _ in range(args.generations):
        start = time.perf_counter()
        generate(backend, models.tokenizer, request, progress=False)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"package": tempomaster.__file__, "generate": seconds}))


if __name__ == "__main__":
    main()
