"""Generation time on this CPU, side by side: torch and onnxruntime, this revision and another.

    python benchmarks/bench_cpu_speed.py [--previous /path/to/other/worktree]
        [--repeats 3] [--threads 2] [--height 32 --width 32 --num-frames 17]
        [--steps 10,6,6] [--build-dir DIR] [--out results.json]

The models are the tiny preset's DiT and text encoder with the full-size Wan
VAE (dim 96), all seeded random weights: the scale where the VAE is most of
the time. Each run is a fresh child process that loads the models (or opens
the ONNX build, exported once into --build-dir), then times one generation
(loading excluded), the same seed, settings and thread count for all. The
runs are interleaved: every round runs every variant once, so a busy
machine slows them alike; the figures are medians over the rounds.

A variant is a backend and a source tree: this checkout, or --previous (a
git worktree of an earlier commit; its own `tempomaster` is imported, from
the same virtual environment). Both read the same build. Recorded per run:
the generation's seconds, per stage its seconds and the seconds inside VAE
encode and decode calls (the VAE's share), and every backend call's time, so
that the first call of a kind can be set against the later ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parents[1]
SEED_WEIGHTS = 20251116


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--previous", type=Path, default=None, help="a worktree of the revision to compare with")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--steps", default="10,6,6")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/tempomaster-bench-cpu-speed"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# In the child: whichever `tempomaster` is on the path
# ----------------------------------------------------------------------------


def bench_models():
    """Tiny DiT and text encoder, full-size Wan VAE, seeded: the same bytes in every process and revision."""
    import dataclasses

    import torch

    from tempomaster.models.presets import VAEConfig
    from tempomaster.models.tiny import build_tiny_models
    from tempomaster.models.vae import WanVAE

    models = build_tiny_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_WEIGHTS)
        vae = WanVAE(VAEConfig()).eval()
    return dataclasses.replace(models, vae=vae, preset=dataclasses.replace(models.preset, vae=VAEConfig()))


class TimedBackend:
    """Passes every call through and records its wall time; the stage is counted from the VAE encodes."""

    def __init__(self, inner):
        self.inner, self.info, self.device, self.name = inner, inner.info, inner.device, inner.name
        for attr in ("vae_batch", "vae_encode_batch"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        self.calls: list[dict] = []
        self._stage, self._last = -1, None

    def _timed(self, method: str, fn, *args):
        if method == "vae_encode" and self._last != "vae_encode":
            self._stage += 1
        self._last = method
        start = time.perf_counter()
        out = fn(*args)
        self.calls.append(
            {
                "method": method,
                "stage": max(self._stage, 0),
                "shape": list(args[0].shape),
                "seconds": time.perf_counter() - start,
            }
        )
        return out

    def encode_text(self, ids, mask):
        return self._timed("encode_text", self.inner.encode_text, ids, mask)

    def velocity(self, *args):
        return self._timed("velocity", self.inner.velocity, *args)

    def vae_encode(self, video):
        return self._timed("vae_encode", self.inner.vae_encode, video)

    def vae_decode(self, latents):
        return self._timed("vae_decode", self.inner.vae_decode, latents)


def export_build(build_dir: Path, height: int, width: int, num_frames: int) -> Path:
    """The fp32 ONNX build of the bench models at this shape, exported once (into a fresh folder, then renamed)."""
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape

    build = build_dir / f"tinydit-wanvae-{height}x{width}-F{num_frames}"
    if (build / "manifest.json").is_file():
        return build
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build.with_name(build.name + f".tmp{os.getpid()}")
    shape = ExportShape(height=height, width=width, num_frames=num_frames, intervals=(4, 2, 1))
    export_onnx(bench_models(), "fp32", shape, tmp, preset_name="tiny", progress=False, copy=True)
    tmp.rename(build)
    return build


def run_child(args) -> dict:
    import torch

    import tempomaster
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    torch.set_num_threads(args.threads)
    load_start = time.perf_counter()
    if args.child == "torch":
        from tempomaster.runtime.backends.torch import TorchBackend

        models = bench_models()
        backend, tokenizer = TorchBackend(models), models.tokenizer
    else:
        from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend.from_build(
            export_build(args.build_dir, args.height, args.width, args.num_frames), threads=args.threads
        )
        tokenizer = backend.tokenizer()
    load_seconds = time.perf_counter() - load_start
    timed = TimedBackend(backend)
    steps = tuple(int(s) for s in args.steps.split(","))
    request = GenerationRequest(
        prompt="a red ball bouncing on a beach",
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        steps_per_stage=steps,
        seed=args.seed,
    )
    result = generate(timed, tokenizer, request, progress=False)
    frames = result.video.frames
    stages = []
    for out in result.stages:
        vae = sum(c["seconds"] for c in timed.calls if c["stage"] == out.index and c["method"].startswith("vae"))
        stages.append(
            {
                "stage": out.index,
                "seconds": out.seconds,
                "vae_seconds": vae,
                "vae_share": vae / out.seconds,
                "vae_encode_calls": sum(c["stage"] == out.index and c["method"] == "vae_encode" for c in timed.calls),
            }
        )
    return {
        "source": str(Path(tempomaster.__file__).resolve().parents[1]),
        "backend": args.child,
        "load_seconds": load_seconds,
        "seconds": result.seconds,
        "stages": stages,
        "calls": timed.calls,
        "frames_uint8_sum": int(((frames.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).sum()),
        "frames": frames.tolist(),
    }


# ----------------------------------------------------------------------------
# The parent: interleaved rounds
# ----------------------------------------------------------------------------


def child_command(args, backend: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        backend,
        "--threads",
        str(args.threads),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--num-frames",
        str(args.num_frames),
        "--steps",
        args.steps,
        "--seed",
        str(args.seed),
        "--build-dir",
        str(args.build_dir),
    ]


def run_variant(args, tree: Path, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(child_command(args, backend), env=env, cwd=tree, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{backend} in {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def first_and_later(runs: list[dict]) -> dict:
    """Per call kind and shape: the first call's seconds against the median of the later ones (medians over runs)."""
    out = {}
    for method in ("encode_text", "velocity", "vae_encode", "vae_decode"):
        firsts, laters = [], []
        for run in runs:
            calls = [c for c in run["calls"] if c["method"] == method]
            if not calls:
                continue
            same = [c["seconds"] for c in calls[1:] if c["shape"] == calls[0]["shape"]]
            firsts.append(calls[0]["seconds"])
            if same:
                laters.append(statistics.median(same))
        if firsts:
            out[method] = {
                "first": round(statistics.median(firsts), 3),
                "later_same_shape": round(statistics.median(laters), 3) if laters else None,
            }
    return out


def summarise(runs: list[dict]) -> dict:
    stages = []
    for k in range(len(runs[0]["stages"])):
        per = [r["stages"][k] for r in runs]
        stages.append(
            {
                "stage": k,
                "seconds": round(statistics.median(p["seconds"] for p in per), 2),
                "vae_seconds": round(statistics.median(p["vae_seconds"] for p in per), 2),
                "vae_share": round(statistics.median(p["vae_share"] for p in per), 3),
                "vae_encode_calls": per[0]["vae_encode_calls"],
            }
        )
    return {
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 2),
        "seconds_all": [round(r["seconds"], 2) for r in runs],
        "load_seconds_median": round(statistics.median(r["load_seconds"] for r in runs), 2),
        "stages": stages,
        "first_vs_later_calls": first_and_later(runs),
    }


def frames_agreement(a: dict, b: dict) -> dict:
    import torch

    if a["frames"] is None or b["frames"] is None:
        return {}
    fa, fb = torch.tensor(a["frames"]), torch.tensor(b["frames"])
    mse = float(((fa - fb) / 2).pow(2).mean())  # frames in [-1, 1]: peak 1 after halving
    return {
        "max_abs": float((fa - fb).abs().max()),
        "max_abs_x255": float(127.5 * (fa - fb).abs().max()),
        "psnr_db": (float("inf") if mse == 0 else round(10 * __import__("math").log10(1 / mse), 1)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    # the build is exported once, by this checkout, before any timed run
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.bench_cpu_speed import export_build; from pathlib import Path; "
            f"export_build(Path(sys.argv[2]), {args.height}, {args.width}, {args.num_frames})",
            str(HERE),
            str(args.build_dir),
        ],
        check=True,
        cwd=HERE,
    )
    trees = {"this": HERE}
    if args.previous is not None:
        trees["previous"] = args.previous.resolve()
    variants = [(t, b) for t in trees for b in args.backends.split(",")]
    runs: dict[str, list[dict]] = {f"{t}:{b}": [] for t, b in variants}
    for r in range(args.repeats):
        for t, b in variants:
            run = run_variant(args, trees[t], b)
            runs[f"{t}:{b}"].append(run)
            print(f"round {r + 1}: {t}:{b} {run['seconds']:.2f} s", flush=True)
    summary = {k: summarise(v) for k, v in runs.items()}
    base = summary.get("previous:torch", summary[next(iter(summary))])["seconds_median"]
    for v in summary.values():
        v["speedup_vs_previous_torch"] = round(base / v["seconds_median"], 2)
    reference = runs.get("previous:torch", runs[next(iter(runs))])[0]
    agreement = {k: frames_agreement(v[0], reference) for k, v in runs.items()}
    result = {
        "what": "one generation, loading excluded: tiny DiT + full-size Wan VAE, seeded random weights",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            "height": args.height,
            "width": args.width,
            "num_frames": args.num_frames,
            "steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "repeats": args.repeats,
            "interleaved": True,
        },
        "trees": {k: str(v) for k, v in trees.items()},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "summary": summary,
        "frames_vs_previous_torch": agreement,
    }
    out = args.out or RESULTS_DIR / f"cpu-speed-{args.height}x{args.width}-F{args.num_frames}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for k, v in summary.items():
        print(
            f"{k:22s} {v['seconds_median']:7.2f} s  ({v['speedup_vs_previous_torch']:.2f}x)  "
            f"VAE share per stage {[s['vae_share'] for s in v['stages']]}"
        )
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
