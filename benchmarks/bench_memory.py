"""Peak host memory of `tm-run generate` against the estimate it checks before loading.

Each case runs in a fresh child process (so peaks do not mix): the child
computes the same estimate the CLI computes, then generates, then reports its
own peak RSS (getrusage). Usage:

    python benchmarks/bench_memory.py --frames 17 433 [--steps 2,1,1] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
from tempomaster.runtime.jobs import run_generate
from tempomaster.runtime.request import GenerateOptions, build_jobs, preset_defaults
from tempomaster.runtime.memory import estimate_peak_memory

frames, steps = int(sys.argv[1]), tuple(int(s) for s in sys.argv[2].split(","))
out = Path(tempfile.mkdtemp()) / "v.mp4"
options = GenerateOptions(prompt="a red ball bouncing on a beach", num_frames=frames, steps=steps,
                          progress=False, out=out, threads=1)
defaults, preset, manifest = preset_defaults(options)
request = build_jobs(options, defaults)[0].request
estimate = estimate_peak_memory(preset, request, dtype="fp32", device="cpu")
run_generate(options, echo=lambda text: None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"frames": frames, "estimate_bytes": estimate.host_bytes, "peak_rss_bytes": peak,
                  "parts": estimate.parts}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 433])
    p.add_argument("--steps", default="2,1,1")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for frames in args.frames:
        res = subprocess.run([sys.executable, "-c", CHILD, str(frames), args.steps], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{frames:5d} frames: estimate {row['estimate_bytes'] / 2**20:8.0f} MiB, measured peak "
            f"{row['peak_rss_bytes'] / 2**20:8.0f} MiB ({row['estimate_bytes'] / row['peak_rss_bytes']:.2f}x)"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as fh:
            json.dump(rows, fh, indent=1)
        Path(fh.name).replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
