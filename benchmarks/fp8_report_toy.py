"""FP8 quality report on the trained toy preset: what FP8 does to videos that show something.

Calibrates the toy DiT on toy captions (whole next-frame-rate generations at
the preset's shape), then generates held-out captions unquantized and with
the FP8 DiT (the same float8 cast as the exported Q/DQ graph), and reports
beside the velocity error and PSNR what `tempomaster.toy.quality` finds in
each video: is the object there, does it move smoothly, does the video keep
its blueprint. Variants: FP8 Linears (`all_stages`), FP8 Linears with
stage-0 scales (`stage0_only`) and all FP8 (`all_fp8`: Linears and the
self-attentions' q, k, v, q and k smoothed and rotated first, what
`--fp8-attention on` builds).

A prompt passes when its video meets the toy's own bounds (docs/toy.md,
tests/test_toy_quality.py): the colour found in >= 90% of the frames, no
centroid step over 6 px, a sliding object moved >= 8 px the asked way, the
final frames >= 20 dB from their blueprint. The summary lists, per variant,
the prompts that pass unquantized and fail with FP8.

    python -m benchmarks.fp8_report_toy [--calib-prompts 12] [--report-prompts 6]
        [--variants all_stages,stage0_only,all_fp8] [--calibration DIR]
        [--out benchmarks/results/fp8_report_toy.json]

--variants runs only those FP8 variants (the unquantized videos are always
made). --calibration DIR keeps the calibration in DIR and, when DIR already
holds one made on the same captions, reuses it instead of calibrating again.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_backends import write_json

PRESENCE_BOUND = 0.9
JUMP_BOUND_PX = 6.0
BLUEPRINT_BOUND_DB = 20.0


def toy_checks(q: dict) -> dict[str, bool]:
    """The toy's per-video bounds (docs/toy.md): which of them this video meets."""
    jump = q["max_jump"]
    return {
        "object_found": q["presence"] >= PRESENCE_BOUND,
        "smooth": jump == jump and jump <= JUMP_BOUND_PX,  # NaN: never found twice in a row
        "follows_motion": q["follows_motion"] is not False,
        "keeps_blueprint": q["blueprint_psnr"] is not None and q["blueprint_psnr"] >= BLUEPRINT_BOUND_DB,
    }


def passes(q: dict) -> bool:
    return all(toy_checks(q).values())


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
    p.add_argument("--report-prompts", type=int, default=6)
    p.add_argument("--variants", default=None, help="comma-separated FP8 variants to run (default: all)")
    p.add_argument("--calibration", type=Path, default=None, help="keep (or reuse) the calibration in this folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fp8_report_toy.json"))
    args = p.parse_args(argv)

    from tempomaster.calibration.collect import calibrate, load_calibration
    from tempomaster.calibration.prompts import CalibrationPrompt
    from tempomaster.calibration.report import VARIANTS, format_report, quality_report
    from tempomaster.errors import UsageError
    from tempomaster.export.shapes import ExportShape
    from tempomaster.models.sources import load_model_set
    from tempomaster.toy.quality import measure_generation

    models = load_model_set("toy", None, None, torch.float32)
    shape = ExportShape.from_preset(models.preset)
    calib, held = toy_prompt_split(args.calib_prompts, args.report_prompts)
    variants = VARIANTS if args.variants is None else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants: choose among {', '.join(VARIANTS)}")

    def measure(prompt, result) -> dict:
        return measure_generation(result, prompt).as_dict()

    def calibrated(folder: Path):
        """The calibration in `folder` when made on these captions (and with the attention amax), else a new one."""
        try:
            cal = load_calibration(folder)
            if [x["prompt"] for x in cal.data["prompts"]] == calib:
                cal.attention_table()  # refuses one made before the q/k rotation
                print(f"reusing the calibration in {folder}")
                return cal, True
        except UsageError:
            pass
        cal = calibrate(
            models,
            shape,
            folder,
            prompts=[CalibrationPrompt(c) for c in calib],
            calib_set="full",
            seed=0,
            preset_name="toy",
            report=False,
            progress=False,
            log=None,
        )
        return cal, False

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cal, reused = calibrated(args.calibration or Path(tmp))
        report = quality_report(
            models,
            shape,
            cal,
            prompts=len(held),
            held_out=held,
            measure=measure,
            progress=False,
            variants=variants,
        )
        seconds = time.perf_counter() - start
    print(format_report(report))
    for prompt, figures in report["video_measures"].items():
        print(prompt)
        for variant, q in figures.items():
            print(
                f"  {variant:<12} presence {q['presence']:.2f}  max jump {q['max_jump']:.2f} px  "
                f"blueprint PSNR {q['blueprint_psnr']:.2f} dB  follows motion {q['follows_motion']}  "
                f"{'pass' if passes(q) else 'FAIL ' + ','.join(k for k, ok in toy_checks(q).items() if not ok)}"
            )
    measures = report["video_measures"]
    passing = [p for p, f in measures.items() if passes(f["unquantized"])]
    kept = {
        v: {
            "passes": [p for p in measures if passes(measures[p][v])],
            "lost": [p for p in passing if not passes(measures[p][v])],
        }
        for v in report["variants"]
    }
    print(f"pass unquantized: {len(passing)} of {len(measures)}")
    for v, k in kept.items():
        print(
            f"  {v:<12} passes {len(k['passes'])} of {len(measures)}; of the unquantized passes, lost {len(k['lost'])}"
            + (f": {k['lost']}" if k["lost"] else "")
        )
    out = {
        "note": __doc__.split("\n\n")[1].replace("\n", " "),
        "calibration_prompts": calib,
        "calibration_videos": len(cal.data["prompts"]),
        "calibration_reused": reused,
        "seconds_total": round(seconds, 1),
        "bounds": {
            "presence": PRESENCE_BOUND,
            "max_jump_px": JUMP_BOUND_PX,
            "blueprint_psnr_db": BLUEPRINT_BOUND_DB,
            "motion_px": 8.0,
        },
        "pass_unquantized": passing,
        "kept": kept,
        "report": report,
    }
    write_json(out, args.out)
    print(f"wrote {args.out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
