"""FP8 quality report on the trained toy preset: what FP8 does to videos that show something.

Calibrates the toy DiT on toy captions (whole next-frame-rate generations at
the preset's shape), then generates held-out captions unquantized and with
the FP8 DiT (the same float8 cast as the exported Q/DQ graph), and reports
beside the velocity error and PSNR what `tempomaster.toy.quality` finds in
each video: is the object there, does it move smoothly, does the video keep
its blueprint.

    python -m benchmarks.fp8_report_toy [--calib-prompts 12] [--report-prompts 4]
        [--out benchmarks/results/fp8_report_toy.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json


def toy_prompt_split(calib: int, report: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out captions, spread over the caption grid (deterministic)."""
    import numpy as np

    from tempomaster.toy.clips import all_captions

    captions = all_captions()
    order = np.random.default_rng(7).permutation(len(captions))
    picked = [captions[i] for i in order[: calib + report]]
    return picked[:calib], picked[calib:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-prompts", type=int, default=12)
    p.add_argument("--report-prompts", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_report_toy.json"))
    args = p.parse_args(argv)

    from tempomaster.calibration.collect import calibrate
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.calibration.report import format_report, quality_report
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.toy.quality import measure_generation

    models = load_model_set("toy", None, None, torch.float32)
    shape = ExportShape.from_preset(models.preset)
    calib, held = toy_prompt_split(args.calib_prompts, args.report_prompts)

    def measure(prompt, result) -> dict:
        return measure_generation(result, prompt).as_dict()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cal = calibrate(models, shape, tmp, prompts=[CalibrationPrompt(c) for c in calib], calib_set="full", seed=0,
                        preset_name="toy", report=False, progress=False, log=None)
        report = quality_report(models, shape, cal, prompts=len(held), held_out=held, measure=measure, progress=False)
        seconds = time.perf_counter() - start
    print(format_report(report))
    for prompt, figures in report["video_measures"].items():
        print(prompt)
        for variant, q in figures.items():
            print(f"  {variant:<12} presence {q['presence']:.2f}  max jump {q['max_jump']:.2f} px  "
                  f"blueprint PSNR {q['blueprint_psnr']:.2f} dB  follows motion {q['follows_motion']}")
    out = {"note": __doc__.split("\n\n")[1].replace("\n", " "), "calibration_prompts": calib,
           "calibration_videos": len(cal.data["prompts"]), "seconds_total": round(seconds, 1), "report": report}
    write_json(out, args.out)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
