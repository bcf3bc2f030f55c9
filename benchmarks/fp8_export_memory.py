"""Peak RSS and file size of the DiT export, fp8 against bf16, with a preset's random weights.

    python benchmarks/fp8_export_memory.py --preset wan-1.3b --precision fp8 --out /tmp/b8
    python benchmarks/fp8_export_memory.py --preset wan-1.3b --precision bf16 --out /tmp/b16

Run each in its own process (peak RSS is per process). Random weights have no
trajectory to calibrate on, so the fp8 run uses a sizing-only calibration:
weights' true amax and every input amax set to 4.0. The graph, its FP8
weights and the memory path (layer-by-layer quantization in place) are the
real ones; the scales are not.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _sizing_calibration(models, shape, preset_name: str, out: Path) -> Path:
    from safetensors.torch import save

    from tempomaster.calibration import collect

    per_tensor, per_channel = collect.weight_amax(models.dit)
    data_bytes = save(per_channel)
    cal_dir = out / collect.CALIBRATION_DIR
    collect._write_atomic(cal_dir / collect.WEIGHT_AMAX_FILE, data_bytes)
    import hashlib

    data = {
        "format": collect.FORMAT,
        "format_version": collect.FORMAT_VERSION,
        "preset": preset_name,
        "shape": collect._shape_key(shape),
        "dit_sha256": collect.dit_weights_sha256(models.dit),
        "seed": 0,
        "settings": {"steps_per_stage": [0], "note": "sizing only: input amax 4.0 everywhere, no trajectory"},
        "prompts": [],
        "weight_amax_file": {"file": collect.WEIGHT_AMAX_FILE, "sha256": hashlib.sha256(data_bytes).hexdigest()},
        "layers": {
            n: {"input_amax": 4.0, "input_amax_per_stage": [4.0], "weight_amax": per_tensor[n]} for n in per_tensor
        },
    }
    path = cal_dir / collect.AMAX_FILE
    collect._write_atomic(path, json.dumps(data).encode())
    return path


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--precision", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape
    from tempomaster.export.source import random_model_set
    from tempomaster.models.presets import get_preset

    preset = get_preset(args.preset)
    t0 = time.perf_counter()
    models = random_model_set(preset, torch.bfloat16, torch.bfloat16, graphs=["dit"])
    load_rss = _rss_gib()
    dit_params = sum(p.numel() for p in models.dit.parameters())
    shape = ExportShape.from_preset(preset, args.height, args.width, args.num_frames)
    if args.precision == "fp8":
        from tempomaster.calibration import export_fp8_onnx

        cal = _sizing_calibration(models, shape, preset.name, args.out)
        manifest = export_fp8_onnx(
            models, shape, args.out, calibration=cal, graphs=["dit"], copy=False, progress=False, log=None
        )
    else:
        manifest = export_onnx(models, "bf16", shape, args.out, graphs=["dit"], copy=False, progress=False)
    files = {k: v["bytes"] for k, v in manifest["files"].items() if k.startswith("onnx/dit")}
    result = {
        "preset": preset.name,
        "precision": args.precision,
        "shape": [args.height, args.width, args.num_frames],
        "dit_params": dit_params,
        "bf16_weight_bytes": 2 * dit_params,
        "rss_after_load_gib": round(load_rss, 3),
        "peak_rss_gib": round(_rss_gib(), 3),
        "dit_files_bytes": files,
        "dit_total_bytes": sum(files.values()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
