"""The toy preset's video for a prompt: its quality figures, and the strip of frames the README shows.

    python -m benchmarks.toy_showcase [--prompt TEXT] [--seed N] [--guidance G] [--preset toy|tiny]
        [--strip FILE.png] [--json FILE.json]

With no flags: the quick start's video (same prompt, preset defaults and seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tempomaster.toy.showcase import QUICKSTART_PROMPT, frame_strip, generate_toy_video


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy_showcase", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=QUICKSTART_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    p.add_argument("--preset", default="toy", choices=["toy", "tiny"])
    p.add_argument("--strip", type=Path, default=None, help="write the strip of frames here (PNG)")
    p.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = p.parse_args(argv)
    video = generate_toy_video(args.prompt, args.seed, args.guidance, args.preset)
    quality = video.measure().as_dict()
    print(json.dumps({"prompt": args.prompt, "seed": args.seed, "preset": args.preset, **quality}, indent=2))
    if args.strip is not None:
        frame_strip(video.stages).save(args.strip)
        print(f"strip written to {args.strip}")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"prompt": args.prompt, "seed": args.seed, "preset": args.preset, **quality}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
