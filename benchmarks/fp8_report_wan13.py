"""FP8 quality report at the wan-1.3b DiT's shape, at a small resolution, on random weights.

The DiT (the only quantized graph) is wan-1.3b's: dim 1536, 30 blocks, 12
heads, seeded random weights. The VAE is the real-size Wan VAE (random). The
text encoder is NOT umT5-XXL: a one-layer T5 with the same output width (4096)
and the tiny tokenizer stands in, because a random umT5-XXL would cost ~11 GB
and minutes per prompt on a CPU while saying nothing more (it is not
quantized). Random weights make the numbers a statement about the arithmetic,
not about picture quality.

    python -m benchmarks.fp8_report_wan13 [--out benchmarks/results/fp8_report_wan-1.3b.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--num-frames", type=int, default=5)
    p.add_argument("--calib-prompts", type=int, default=4, help="how many of the built-in prompts to calibrate on")
    p.add_argument("--report-prompts", type=int, default=2)
    p.add_argument("--steps", default="3,2,2")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_report_wan-1.3b.json"))
    args = p.parse_args(argv)

    from tempomaster.calibration.collect import calibrate
    from tempomaster.calibration.prompts import builtin_prompts
    from tempomaster.calibration.report import format_report
    from tempomaster.export.shapes import ExportShape
    from tempomaster.export.source import random_model_set
    from tempomaster.models.checkpoints import ModelSet
    from tempomaster.models.presets import T5Config, get_preset
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.tokenizer import tiny_tokenizer
    from tempomaster.models.vae import WanVAE

    torch.manual_seed(0)
    base = get_preset("wan-1.3b")
    t5_cfg = T5Config(vocab_size=384, dim=4096, dim_attn=256, dim_ffn=256, num_heads=4, num_layers=1)
    preset = replace(base, t5=t5_cfg)
    dit = random_model_set(base, torch.float32, torch.float32, graphs=["dit"]).dit
    models = ModelSet(
        preset=preset, dit=dit, vae=WanVAE(base.vae).eval(), t5=UMT5Encoder(t5_cfg).eval(), tokenizer=tiny_tokenizer()
    )
    shape = ExportShape(height=args.height, width=args.width, num_frames=args.num_frames, intervals=(4, 2, 1))
    steps = tuple(int(s) for s in args.steps.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cal = calibrate(
            models,
            shape,
            tmp,
            prompts=builtin_prompts()[: args.calib_prompts],
            calib_steps=steps,
            seed=0,
            preset_name="wan-1.3b",
            report=True,
            report_prompts=args.report_prompts,
            progress=False,
            log=None,
        )
        seconds = time.perf_counter() - start
        report = json.loads((Path(tmp) / "calibration" / "report.json").read_text())
    print(format_report(report))
    out = {
        "note": __doc__.split("\n\n")[1].replace("\n", " "),
        "shape": vars(shape) | {"intervals": list(shape.intervals)},
        "steps": list(steps),
        "calibration_videos": len(cal.data["prompts"]),
        "seconds_total": round(seconds, 1),
        "report": report,
    }
    write_json(out, args.out)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
