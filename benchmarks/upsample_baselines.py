"""tm-run upsample against the frame-rate lifts people use today, on the toy preset where the truth is known.

    pip install -e '.[bench]'     # opencv-python-headless, for the optical-flow baseline
    OMP_NUM_THREADS=1 python -m benchmarks.upsample_baselines [--clips 12] [--json FILE] [--strip FILE.png]

Clips come from the toy's training renderer (tempomaster/toy/clips.py) at 24
fps with held-out seeds (from 2**31 up: the trainer draws seeds below 2**31),
two per motion. Every 4th frame is kept (6 fps, 17 frames) and lifted back
to 24 fps (68 frames) by:

- upsample: the toy preset's stages 1 and 2 with the kept frames as stage 0's
  output (runtime/upsample.lift, what `tm-run upsample` runs after decoding),
  prompted with the clip's caption, seed 0, the preset's steps and guidance;
- repeat: each kept frame held for 4 frames;
- blend: linear cross-fade between consecutive kept frames;
- flow: OpenCV DIS optical flow (medium preset) both ways between
  consecutive kept frames, each side warped to time t with the linear-motion
  estimates F_t0 = -(1-t) t F01 + t^2 F10 and F_t1 = (1-t)^2 F01 - t(1-t) F10,
  then blended (1-t, t).

Measured on the in-between frames (frames 4k+1..4k+3 between two kept
frames: 48 per clip; the 3 frames after the last kept frame are left out,
every method can only extrapolate there): PSNR and SSIM against the true
frames (SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, on each RGB
channel, averaged), the object's centroid error in pixels (the toy's detector,
clips.object_centroids, on both frames; over frames where both find it) and
the share of in-between frames where the detector finds the object at all.
The kept frames' PSNR says how much of the input survives a method: the
baselines return the kept frames as they are (infinite PSNR); upsample
returns them through the toy's VAE, like every frame it makes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

FACTOR = 4  # 6 fps kept, 24 fps out
KEPT = 17  # a stage's input is 4k + 1 frames
HELD_OUT_BASE = 2**31
METHODS = ("upsample", "repeat", "blend", "flow")


# ----------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution of [H, W] with the 1-D window along both axes."""
    rows = np.apply_along_axis(lambda r: np.convolve(r, w, mode="valid"), 1, img)
    return np.apply_along_axis(lambda c: np.convolve(c, w, mode="valid"), 0, rows)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of two uint8 [H, W, 3] frames, per channel, float64, valid windows only."""
    w = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        mx, my = _filter(x, w), _filter(y, w)
        sxx = _filter(x * x, w) - mx * mx
        syy = _filter(y * y, w) - my * my
        sxy = _filter(x * y, w) - mx * my
        s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def between_frames(total: int) -> list[int]:
    """Frames strictly between two kept frames."""
    last_kept = (KEPT - 1) * FACTOR
    return [i for i in range(total) if i % FACTOR and i < last_kept]


def measure(pred: np.ndarray, truth: np.ndarray, colour: str) -> dict:
    from tempomaster.toy.clips import object_centroids

    idx = between_frames(len(truth))
    p, t = pred[idx], truth[idx]
    cp, ct = object_centroids(p, colour), object_centroids(t, colour)
    found = ~np.isnan(cp[:, 0])
    both = found & ~np.isnan(ct[:, 0])
    errors = np.linalg.norm(cp[both] - ct[both], axis=1)
    kept = [i for i in range(0, len(truth), FACTOR)]
    kept_psnr = [psnr(x, y) for x, y in zip(pred[kept], truth[kept])]
    return {
        # the kept frames themselves: exact for the baselines; upsample returns them through the VAE
        "kept_psnr_db": float(np.mean(kept_psnr)) if all(map(math.isfinite, kept_psnr)) else None,  # None: exact
        "psnr_db": float(np.mean([psnr(x, y) for x, y in zip(p, t)])),
        "ssim": float(np.mean([ssim(x, y) for x, y in zip(p, t)])),
        "centroid_error_px": float(errors.mean()) if errors.size else float("nan"),
        "presence": float(found.mean()),
        "frames": len(idx),
    }


# ----------------------------------------------------------------------------
# The baselines: kept uint8 frames [K, H, W, 3] -> [K * FACTOR, H, W, 3]
# ----------------------------------------------------------------------------


def lift_repeat(kept: np.ndarray) -> np.ndarray:
    return np.repeat(kept, FACTOR, axis=0)


def _pairs(kept: np.ndarray, between) -> np.ndarray:
    """Frame 4k + j from kept[k], kept[k + 1] and t = j / 4; after the last kept frame, that frame held."""
    out = []
    for k in range(len(kept)):
        for j in range(FACTOR):
            out.append(kept[k] if j == 0 or k + 1 == len(kept) else between(kept[k], kept[k + 1], j / FACTOR))
    return np.stack(out)


def lift_blend(kept: np.ndarray) -> np.ndarray:
    def blend(a, b, t):
        return np.clip((1 - t) * a.astype(np.float64) + t * b.astype(np.float64) + 0.5, 0, 255).astype(np.uint8)

    return _pairs(kept, blend)


def lift_flow(kept: np.ndarray) -> np.ndarray:
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    h, w = kept.shape[1:3]
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=-1)
    cache = {}

    def flows(a, b):
        key = (a.tobytes(), b.tobytes())
        if key not in cache:
            ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
            cache.clear()
            cache[key] = dis.calc(ga, gb, None), dis.calc(gb, ga, None)
        return cache[key]

    def warp(img, flow):
        m = grid + flow
        return cv2.remap(img, m[..., 0], m[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def between(a, b, t):
        f01, f10 = flows(a, b)
        ft0 = -(1 - t) * t * f01 + t * t * f10
        ft1 = (1 - t) ** 2 * f01 - t * (1 - t) * f10
        mix = (1 - t) * warp(a, ft0).astype(np.float64) + t * warp(b, ft1).astype(np.float64)
        return np.clip(mix + 0.5, 0, 255).astype(np.uint8)

    return _pairs(kept, between)


def lift_upsample(kept: np.ndarray, prompt: str, backend, tokenizer) -> np.ndarray:
    """The runtime's own lift (tm-run upsample after decoding): the kept frames as stage 0's output."""
    import torch
    from PIL import Image

    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.pipeline import cover_resize_center_crop
    from tempomaster.runtime.request import GenerateOptions, build_jobs
    from tempomaster.runtime.upsample import VideoInfo, lift, plan_lift
    from tempomaster.runtime.video import to_uint8_frames

    (job,) = build_jobs(GenerateOptions(prompt=prompt, preset="toy", seed=0), get_preset("toy").defaults)
    h, w = kept.shape[1:3]
    plan = plan_lift(job.request, VideoInfo(Path("<kept frames>"), 6.0, w, h, len(kept)), None)
    frames = torch.stack(
        [cover_resize_center_crop(Image.fromarray(f), job.request.height, job.request.width) for f in kept], dim=1
    )
    return to_uint8_frames(lift(backend, tokenizer, plan, frames).video.frames)


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def clip_specs(count: int):
    from tempomaster.toy.clips import MOTIONS, sample_clip_spec

    return [sample_clip_spec(HELD_OUT_BASE + i, motion=MOTIONS[i % len(MOTIONS)]) for i in range(count)]


def strip(rows: list[tuple[str, np.ndarray]], frames: list[int], scale: int = 2, gap: int = 3, label_w: int = 70):
    """A PIL image: one labelled row per method, the given frames side by side."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    canvas = Image.new(
        "RGB", (label_w + len(frames) * (w * scale + gap), len(rows) * (h * scale + gap)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for r, (name, video) in enumerate(rows):
        y = r * (h * scale + gap)
        draw.text((4, y + h * scale // 2 - 6), name, fill=(0, 0, 0))
        for c, i in enumerate(frames):
            tile = Image.fromarray(video[i]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w * scale + gap), y))
    return canvas


def run(count: int, strip_paths: list[Path]) -> dict:
    import torch

    from tempomaster.runtime.video import to_uint8_frames
    from tempomaster.toy.clips import render_clip
    from tempomaster.toy.showcase import load_backend

    backend, tokenizer = load_backend("toy")
    per_clip, totals = [], {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    for n, spec in enumerate(clip_specs(count)):
        truth = to_uint8_frames(render_clip(spec, KEPT * FACTOR))
        kept = truth[::FACTOR]
        lifted = {}
        for method in METHODS:
            start = time.perf_counter()
            if method == "upsample":
                lifted[method] = lift_upsample(kept, spec.caption, backend, tokenizer)
            else:
                lifted[method] = {"repeat": lift_repeat, "blend": lift_blend, "flow": lift_flow}[method](kept)
            seconds[method] += time.perf_counter() - start
            assert lifted[method].shape == truth.shape, (method, lifted[method].shape)
        scores = {m: measure(lifted[m], truth, spec.colour) for m in METHODS}
        for m in METHODS:
            totals[m].append(scores[m])
        per_clip.append({"seed": HELD_OUT_BASE + n, "caption": spec.caption, **scores})
        print(
            f"[{n + 1}/{count}] {spec.caption}: "
            + ", ".join(
                f"{m} {s['psnr_db']:.1f} dB / {s['centroid_error_px']:.2f} px / {s['presence']:.2f}"
                for m, s in scores.items()
            )
        )
        if n == 0 and strip_paths:
            rows = [("truth", truth)] + [(m, lifted[m]) for m in METHODS]
            image = strip(rows, list(range(0, 13)))
            for path in strip_paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)
    summary = {}
    for m in METHODS:
        rows = totals[m]
        errors = [r["centroid_error_px"] for r in rows if not math.isnan(r["centroid_error_px"])]
        summary[m] = {
            "psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
            "kept_psnr_db": (
                None
                if any(r["kept_psnr_db"] is None for r in rows)
                else float(np.mean([r["kept_psnr_db"] for r in rows]))
            ),
            "ssim": float(np.mean([r["ssim"] for r in rows])),
            "centroid_error_px": float(np.mean(errors)) if errors else float("nan"),
            "presence": float(np.mean([r["presence"] for r in rows])),
            "seconds_per_clip": seconds[m] / count,
        }
    return {
        "what": "toy clips at 24 fps, every 4th frame kept (6 fps, 17 frames), lifted back to 68 frames; "
        "measured on the 48 in-between frames of each clip",
        "clips": count,
        "methods": list(METHODS),
        "summary": summary,
        "per_clip": per_clip,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }


def table(summary: dict) -> str:
    lines = [
        "| method | PSNR (dB) | SSIM | centroid error (px) | object found | kept frames' PSNR (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        lines.append(
            f"| {m} | {s['psnr_db']:.2f} | {s['ssim']:.3f} | {s['centroid_error_px']:.2f} | "
            f"{100 * s['presence']:.0f}% | {'exact' if s['kept_psnr_db'] is None else format(s['kept_psnr_db'], '.1f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python -m benchmarks.upsample_baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=12, help="held-out clips, cycling through the motions (default 12)")
    p.add_argument("--json", type=Path, default=root / "benchmarks" / "results" / "upsample_baselines_toy.json")
    p.add_argument(
        "--strip",
        type=Path,
        action="append",
        default=None,
        help="side-by-side strip of the first clip (PNG; repeatable; default: benchmarks/results and docs)",
    )
    args = p.parse_args(argv)
    strips = args.strip or [
        root / "benchmarks" / "results" / "upsample_strip_toy.png",
        root / "docs" / "upsample-strip.png",
    ]
    data = run(args.clips, strips)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data["summary"]))
    print(f"written: {args.json}, {', '.join(map(str, strips))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
