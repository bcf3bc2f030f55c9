"""Peak memory and time of a tiled vs an untiled VAE decode, side by side.

    python benchmarks/bench_vae_tiling.py [--preset wan-1.3b] [--height 480 --width 832]
        [--latent-frames 28] [--dtype fp32|bf16] [--device cpu|cuda] [--threads 1]
        [--tile 30,52 --stride 15,26] [--seed 0] [--out results.json]

One chunk of normalised latents [1, 16, F, H/8, W/8] is decoded by the
preset's VAE with seeded random weights, untiled and with the release's
tiling, each in a fresh child process, one after the other, so that each
peak is its own: on CPU the peak resident set (ru_maxrss) of the child,
also given above the child's resident set just before the decode; on CUDA
torch's peak allocated memory during the decode. The two outputs are
compared (they differ: the tiles see less context, which is the release's
behaviour, not an error) and everything is written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(v) for v in text.split(","))
    return a, b


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="wan-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument(
        "--latent-frames", type=int, default=28, help="latent frames of the chunk (28: the release's 109-frame chunk)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tile", type=_pair, default=(30, 52), help="tile size in latent units, H,W")
    p.add_argument("--stride", type=_pair, default=(15, 26), help="tile stride in latent units, H,W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=["untiled", "tiled"], help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> int:
    from tempomaster.models.presets import get_preset
    from tempomaster.models.vae import WanVAE
    from tempomaster.models.vae_tiling import TileSpec, tile_grid

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    vae = WanVAE(get_preset(args.preset).vae).to(device, dtype).eval()
    h, w = args.height // vae.spatial_ratio, args.width // vae.spatial_ratio
    g = torch.Generator().manual_seed(args.seed + 1)
    latents = torch.randn(1, vae.z_dim, args.latent_frames, h, w, generator=g).to(dtype)
    tile = TileSpec(args.tile, args.stride) if args.child == "tiled" else None
    if device.type == "cuda":
        latents = latents.to(device) if tile is None else latents
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    before = _rss_mib()
    start = time.perf_counter()
    with torch.inference_mode():
        frames = vae.decode(latents, tile=tile) if tile is not None else vae.decode(latents.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "variant": args.child,
        "seconds": round(seconds, 2),
        "rss_before_decode_mib": round(before, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "output_shape": list(frames.shape),
        "tiles": len(tile_grid(h, w, tile)) if tile is not None else 1,
    }
    result["peak_rss_above_before_mib"] = round(result["peak_rss_mib"] - before, 1)
    if device.type == "cuda":
        result["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["cuda_allocated_before_mib"] = round(base, 1)
    torch.save(frames.float().cpu(), args.child_out.with_suffix(".pt"))
    args.child_out.write_text(json.dumps(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    results = {}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("untiled", "tiled"):
            out = Path(tmp) / f"{variant}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--child-out",
                str(out),
                "--preset",
                args.preset,
                "--height",
                str(args.height),
                "--width",
                str(args.width),
                "--latent-frames",
                str(args.latent_frames),
                "--dtype",
                args.dtype,
                "--device",
                args.device,
                "--threads",
                str(args.threads),
                "--tile",
                ",".join(map(str, args.tile)),
                "--stride",
                ",".join(map(str, args.stride)),
                "--seed",
                str(args.seed),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            subprocess.run(cmd, check=True, env=env)
            results[variant] = json.loads(out.read_text())
            outputs[variant] = torch.load(out.with_suffix(".pt"))
            print(
                f"{variant:8s} {results[variant]['seconds']:9.1f} s  peak RSS {results[variant]['peak_rss_mib']:9.1f} MiB "
                f"({results[variant]['peak_rss_above_before_mib']:.1f} above the {results[variant]['rss_before_decode_mib']:.1f} before)",
                flush=True,
            )
    a, b = outputs["tiled"].double(), outputs["untiled"].double()
    data = {
        "what": "VAE decode of one chunk, untiled vs the release's tiling",
        "preset": args.preset,
        "height": args.height,
        "width": args.width,
        "latent_frames": args.latent_frames,
        "frames": int(outputs["tiled"].shape[2]),
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "tile": {"size": list(args.tile), "stride": list(args.stride)},
        "weights": f"random (seed {args.seed})",
        "untiled": results["untiled"],
        "tiled": results["tiled"],
        "tiled_over_untiled_time": round(results["tiled"]["seconds"] / results["untiled"]["seconds"], 3),
        "tiled_over_untiled_peak_rss_above_before": round(
            results["tiled"]["peak_rss_above_before_mib"] / results["untiled"]["peak_rss_above_before_mib"], 3
        ),
        "tiled_vs_untiled": {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())},
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = (
        args.out
        or RESULTS_DIR
        / f"vae-tiling-{args.preset}-{args.height}x{args.width}-F{args.latent_frames}-{args.dtype}-{args.device}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
