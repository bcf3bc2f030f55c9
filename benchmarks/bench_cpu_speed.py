"""Generation time on this CPU, side by side: torch and onnxruntime, this revision, another, and the release.

    python benchmarks/bench_cpu_speed.py [--scale tiny|wan-1.3b] [--release /path/to/release/tree]
        [--previous /path/to/other/worktree] [--repeats 3] [--threads 2]
        [--height 32 --width 32 --num-frames 17] [--steps 10,6,6] [--build-dir DIR] [--out results.json]
    python benchmarks/bench_cpu_speed.py --chart A.json B.json [--chart-out chart.png]

Two scales, both with the full-size Wan VAE (dim 96) and seeded random weights:
`tiny` (the tiny preset's DiT and text encoder; 32x32, 17 frames, steps
10,6,6 by default), where the VAE is most of the time, and `wan-1.3b` (the
wan-1.3b preset's DiT shape, 1.42B parameters, with a one-layer umT5 of
umT5-XXL's output width standing in for the 5.7B-parameter encoder; 32x32,
9 frames, steps 4,2,2). Every run draws one video from a reference image at
frame 0 (a fixed synthetic picture), which the release needs (its DiT gets
no condition without one). Each run is a fresh child process that loads the
models (or opens the ONNX build, exported once into --build-dir), then times
one generation (loading excluded), the same seed, settings and thread count
for all. The runs are interleaved: every round runs every variant once, so
a busy machine slows them alike; the figures are medians over the rounds.

--release runs the public release's own pipeline (benchmarks/release_child.py
says exactly what it patches at run time, and why) on the same weights: the
models are written once in the release's checkpoint layout into --build-dir
and read by the release's own loader, in float32 on the CPU. Its frames are
the reference the others are compared with (PSNR, max abs), and every
variant's speed is given as a ratio to it (and to --previous's same backend).
The release's imports beyond ours, and the chart's matplotlib: `pip install -e
'.[bench-release]'`. With --release, the chart of every stored result that has
the release (one panel per scale) is redrawn: results/cpu-speed-vs-release.png.

A variant is a backend and a source tree: this checkout, or --previous (a
git worktree of an earlier commit; its own `tempomaster` is imported, from
the same virtual environment), or the release. Both of ours read the same build. Recorded per run:
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
PROMPT = "a red ball bouncing on a beach"
# Per scale: the default frame size, length and steps (issue 37's two settings).
SCALES = {
    "tiny": {"height": 32, "width": 32, "num_frames": 17, "steps": "10,6,6"},
    "wan-1.3b": {"height": 32, "width": 32, "num_frames": 9, "steps": "4,2,2"},
}
REFERENCE_IMAGE_SIZE = 48  # square, larger than the frames: the release's cover resize runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--release", type=Path, default=None, help="a work tree of the public release to compare with")
    p.add_argument("--previous", type=Path, default=None, help="a worktree of the revision to compare with")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--height", type=int, default=None, help="default: the scale's")
    p.add_argument("--width", type=int, default=None, help="default: the scale's")
    p.add_argument("--num-frames", type=int, default=None, help="default: the scale's")
    p.add_argument("--steps", default=None, help="default: the scale's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/tempomaster-bench-cpu-speed"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--chart", type=Path, nargs="+", default=None, help="only draw the chart of these result files")
    p.add_argument("--chart-out", type=Path, default=None)
    p.add_argument("--child", choices=["torch", "onnxruntime", "release"], help=argparse.SUPPRESS)
    p.add_argument("--release-checkpoints", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in SCALES[args.scale].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.release is not None and not (args.release / "pipelines" / "sequential_ppl.py").is_file():
        p.error(f"--release: {args.release} is not a work tree of the release (no pipelines/sequential_ppl.py)")
    if args.previous is not None and not (args.previous / "tempomaster").is_dir():
        p.error(f"--previous: {args.previous} has no tempomaster/ package")
    return args


# ----------------------------------------------------------------------------
# In the child: whichever `tempomaster` is on the path
# ----------------------------------------------------------------------------


def bench_models(scale: str = "tiny"):
    """The scale's DiT and text encoder with the full-size Wan VAE, seeded: the same bytes in every process
    and revision. The DiT's and text encoder's weights are bf16 values, as the release's files hold them."""
    import dataclasses

    import torch

    from tempomaster.models.presets import VAEConfig
    from tempomaster.models.tiny import build_tiny_models
    from tempomaster.models.vae import WanVAE

    if scale == "tiny":
        models = build_tiny_models()
    else:
        models = wan13_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_WEIGHTS)
        vae = WanVAE(VAEConfig()).eval()
    return dataclasses.replace(models, vae=vae, preset=dataclasses.replace(models.preset, vae=VAEConfig()))


def wan13_models():
    """wan-1.3b's DiT (seeded random, 1.42B parameters) and a one-layer umT5 of umT5-XXL's output width."""
    import dataclasses

    import torch

    from tempomaster.export.source import random_model_set
    from tempomaster.models.checkpoints import ModelSet
    from tempomaster.models.presets import T5Config, get_preset
    from tempomaster.models.t5 import UMT5Encoder
    from tempomaster.models.tokenizer import tiny_tokenizer

    base = get_preset("wan-1.3b")
    # the text encoder only has to produce umT5-XXL's 4096-wide embeddings (as benchmarks/fp8_report_wan13.py)
    t5_cfg = T5Config(vocab_size=384, dim=4096, dim_attn=256, dim_ffn=256, num_heads=4, num_layers=1)
    dit = random_model_set(base, torch.float32, torch.float32, seed=SEED_WEIGHTS, graphs=["dit"]).dit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_WEIGHTS + 1)
        t5 = UMT5Encoder(t5_cfg).eval()
    with torch.no_grad():
        for model in (dit, t5):
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return ModelSet(preset=dataclasses.replace(base, t5=t5_cfg), dit=dit, vae=None, t5=t5, tokenizer=tiny_tokenizer())


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


def build_name(scale: str, height: int, width: int, num_frames: int) -> str:
    dit = "tinydit" if scale == "tiny" else "wan13dit"
    return f"{dit}-wanvae-{height}x{width}-F{num_frames}"


def release_checkpoints_dir(build_dir: Path, scale: str) -> Path:
    return build_dir / f"release-checkpoints-{scale}"


def reference_image_path(build_dir: Path) -> Path:
    return build_dir / f"reference-{REFERENCE_IMAGE_SIZE}x{REFERENCE_IMAGE_SIZE}.png"


def prepare(build_dir: Path, scale: str, height: int, width: int, num_frames: int, release: bool, onnx: bool) -> None:
    """Before any timed run: the reference image, the release-layout checkpoints and the ONNX build, each made once
    (into a fresh folder, then renamed) from one copy of the models."""
    import numpy as np
    from PIL import Image

    from tempomaster.models.tiny import release_config, write_release_checkpoints

    build_dir.mkdir(parents=True, exist_ok=True)
    image = reference_image_path(build_dir)
    if not image.is_file():
        # a soft diagonal gradient with a red disc: fixed, smooth, not symmetric
        n = REFERENCE_IMAGE_SIZE
        yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
        rgb = np.stack([0.3 + 0.4 * xx, 0.5 + 0.3 * yy, 0.8 - 0.5 * xx * yy], axis=-1)
        disc = (xx - 0.35) ** 2 + (yy - 0.6) ** 2 < 0.04
        rgb[disc] = (0.9, 0.1, 0.1)
        tmp = image.with_name(image.name + f".tmp{os.getpid()}.png")
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(tmp)
        tmp.replace(image)
    ckpt = release_checkpoints_dir(build_dir, scale)
    build = build_dir / build_name(scale, height, width, num_frames)
    need_release = release and not (ckpt / "inference_configs.json").is_file()
    need_onnx = onnx and not (build / "manifest.json").is_file()
    if not (need_release or need_onnx):
        return
    models = bench_models(scale)
    if need_release:
        write_release_checkpoints(models, ckpt, release_config(ckpt, models.preset))
    if need_onnx:
        from tempomaster.export.build import export_onnx
        from tempomaster.export.shapes import ExportShape

        tmp = build.with_name(build.name + f".tmp{os.getpid()}")
        shape = ExportShape(height=height, width=width, num_frames=num_frames, intervals=(4, 2, 1))
        # copy=False: an fp32 export of fp32 models casts nothing, and a second 1.3B copy would not fit beside it
        export_onnx(models, "fp32", shape, tmp, preset_name=scale, progress=False, copy=False)
        tmp.rename(build)


def bench_request(args) -> dict:
    """The generation every variant makes, as plain values."""
    from tempomaster.runtime.pipeline import DEFAULT_NEGATIVE_PROMPT

    return {
        "prompt": PROMPT,
        "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
        "ref_images": {0: str(reference_image_path(args.build_dir))},
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "frame_intervals": [4, 2, 1],
        "steps_per_stage": [int(s) for s in args.steps.split(",")],
        "shift_per_stage": [5.0, 3.0, 3.0],
        "guidance_scale": 8.0,
        "use_apg": True,
        "seed": args.seed,
    }


def run_child(args) -> dict:
    if args.child == "release":
        from benchmarks.release_child import run_release_child

        return run_release_child(args, bench_request(args))
    import torch
    from PIL import Image

    import tempomaster
    from tempomaster.models.tokenizer import tiny_tokenizer
    from tempomaster.runtime.pipeline import GenerationRequest, generate

    torch.set_num_threads(args.threads)
    load_start = time.perf_counter()
    if args.child == "torch":
        from tempomaster.runtime.backends.torch import TorchBackend

        models = bench_models(args.scale)
        backend, tokenizer = TorchBackend(models), models.tokenizer
    else:
        from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

        build = args.build_dir / build_name(args.scale, args.height, args.width, args.num_frames)
        backend = OnnxRuntimeBackend.from_build(build, threads=args.threads)
        tokenizer = tiny_tokenizer(seq_len=backend.info.text_len)  # the bench models' tokenizer
    load_seconds = time.perf_counter() - load_start
    timed = TimedBackend(backend)
    spec = bench_request(args)
    request = GenerationRequest(
        prompt=spec["prompt"],
        negative_prompt=spec["negative_prompt"],
        ref_images={k: Image.open(v).convert("RGB") for k, v in spec["ref_images"].items()},
        height=spec["height"],
        width=spec["width"],
        num_frames=spec["num_frames"],
        frame_intervals=tuple(spec["frame_intervals"]),
        steps_per_stage=tuple(spec["steps_per_stage"]),
        shift_per_stage=tuple(spec["shift_per_stage"]),
        guidance_scale=spec["guidance_scale"],
        use_apg=spec["use_apg"],
        seed=spec["seed"],
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend, "--scale", args.scale]
    for flag, value in (
        ("--threads", args.threads),
        ("--height", args.height),
        ("--width", args.width),
        ("--num-frames", args.num_frames),
        ("--steps", args.steps),
        ("--seed", args.seed),
        ("--build-dir", args.build_dir),
    ):
        cmd += [flag, str(value)]
    if backend == "release":
        cmd += [
            "--release",
            str(args.release),
            "--release-checkpoints",
            str(release_checkpoints_dir(args.build_dir, args.scale)),
        ]
    return cmd


def run_variant(args, tree: Path, backend: str) -> dict:
    # the release's child imports this checkout's benchmarks/ and tempomaster/ (for reading the file sizes)
    env = dict(os.environ, PYTHONPATH=str(HERE if backend == "release" else tree), OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(child_command(args, backend), env=env, cwd=HERE, capture_output=True, text=True)
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
        "calls_by_shape": calls_by_shape(runs),
    }


def calls_by_shape(runs: list[dict]) -> list[dict]:
    """Per call kind and input shape: calls per run and the median seconds of one call (over every run's calls),
    the first call of each run left out when it has later ones of its shape; where the time goes, e.g. DiT calls
    by batch size."""
    groups: dict[tuple, list[list[float]]] = {}
    for run in runs:
        per_run: dict[tuple, list[float]] = {}
        for c in run["calls"]:
            per_run.setdefault((c["method"], tuple(c["shape"])), []).append(c["seconds"])
        for key, seconds in per_run.items():
            groups.setdefault(key, []).append(seconds)
    out = []
    for (method, shape), per_run in groups.items():
        pooled = [x for seconds in per_run for x in (seconds[1:] if len(seconds) > 1 else seconds)]
        out.append(
            {
                "method": method,
                "shape": list(shape),
                "calls_per_run": len(per_run[0]),
                "seconds_median": round(statistics.median(pooled), 3),
            }
        )
    return out


def frames_agreement(a: dict, b: dict) -> dict:
    import math

    import torch

    if a["frames"] is None or b["frames"] is None:
        return {}
    fa, fb = torch.tensor(a["frames"]), torch.tensor(b["frames"])
    if fa.shape != fb.shape:
        return {"shape_mismatch": [list(fa.shape), list(fb.shape)]}
    mse = float(((fa - fb) / 2).pow(2).mean())  # frames in [-1, 1]: peak 1 after halving
    return {
        "max_abs": float((fa - fb).abs().max()),
        "max_abs_x255": float(127.5 * (fa - fb).abs().max()),
        "psnr_db": (float("inf") if mse == 0 else round(10 * math.log10(1 / mse), 1)),
    }


def ratios(summary: dict) -> None:
    """Each variant's speed against the release and the previous revision's same backend (> 1: faster).

    speedup_vs_X: X's median over this variant's median. paired_speedup_vs_X:
    the median over rounds of X's seconds over this variant's in the same
    round (`seconds_all` is in round order), which a load that comes and goes
    between rounds disturbs less.
    """
    for name, v in summary.items():
        backend = name.split(":", 1)[1]
        refs = {"release": summary.get("release:torch"), "previous": summary.get(f"previous:{backend}")}
        if backend != "torch":
            refs["previous_torch"] = summary.get("previous:torch")
        for ref_name, ref in refs.items():
            if ref is not None and ref is not v:
                v[f"speedup_vs_{ref_name}"] = round(ref["seconds_median"] / v["seconds_median"], 2)
                per_round = [a / b for a, b in zip(ref["seconds_all"], v["seconds_all"])]
                v[f"paired_speedup_vs_{ref_name}"] = round(statistics.median(per_round), 2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.chart:
        out = args.chart_out or RESULTS_DIR / "cpu-speed-vs-release.png"
        write_chart(args.chart, out)
        print(f"written {out}")
        return 0
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    backends = args.backends.split(",")
    # the release-layout checkpoints and the ONNX build are made once, by this checkout, before any timed run
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from benchmarks.bench_cpu_speed import prepare; "
            "prepare(Path(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7] == '1', sys.argv[8] == '1')",
            str(HERE),
            str(args.build_dir),
            args.scale,
            str(args.height),
            str(args.width),
            str(args.num_frames),
            "1" if args.release else "0",
            "1" if "onnxruntime" in backends else "0",
        ],
        check=True,
        cwd=HERE,
        env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
    )
    trees = {"this": HERE}
    if args.previous is not None:
        trees["previous"] = args.previous.resolve()
    variants = [(t, b) for t in trees for b in backends]
    if args.release is not None:
        trees["release"] = args.release.resolve()
        variants.insert(0, ("release", "torch"))
    runs: dict[str, list[dict]] = {f"{t}:{b}": [] for t, b in variants}
    load_at_start = os.getloadavg()
    load_per_round = []
    for r in range(args.repeats):
        for t, b in variants:
            run = run_variant(args, trees[t], "release" if t == "release" else b)
            runs[f"{t}:{b}"].append(run)
            print(f"round {r + 1}: {t}:{b} {run['seconds']:.2f} s", flush=True)
        load_per_round.append([round(x, 2) for x in os.getloadavg()])
    summary = {k: summarise(v) for k, v in runs.items()}
    ratios(summary)
    reference_name = next(k for k in ("release:torch", "previous:torch", next(iter(runs))) if k in runs)
    reference = runs[reference_name][0]
    agreement = {k: frames_agreement(v[0], reference) for k, v in runs.items() if k != reference_name}
    result = {
        "what": f"one generation, loading excluded, {args.scale} scale: {SCALE_NOTES[args.scale]}",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {
            "scale": args.scale,
            "height": args.height,
            "width": args.width,
            "num_frames": args.num_frames,
            "steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "repeats": args.repeats,
            "interleaved": True,
            "request": {k: v for k, v in bench_request(args).items() if k not in ("negative_prompt", "ref_images")},
            "reference_image": f"{REFERENCE_IMAGE_SIZE}x{REFERENCE_IMAGE_SIZE} synthetic picture at frame 0",
        },
        "trees": {k: str(v) for k, v in trees.items()},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load_at_start],
            "load_average_per_round": load_per_round,
        },
        "summary": summary,
        "frames_reference": reference_name,
        "frames_vs_reference": agreement,
    }
    if args.release is not None:
        result["release_torchvision_stand_in"] = runs["release:torch"][0].get("torchvision_stand_in")
    out = args.out or RESULTS_DIR / f"cpu-speed-{args.scale}-{args.height}x{args.width}-F{args.num_frames}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    for k, v in summary.items():
        speed = ", ".join(
            f"{name.replace('speedup_vs_', 'vs ')} {x:.2f}x" for name, x in v.items() if "speedup_vs_" in name
        )
        print(
            f"{k:22s} {v['seconds_median']:7.2f} s  ({speed or 'reference'})  "
            f"VAE share per stage {[s['vae_share'] for s in v['stages']]}  frames {agreement.get(k, 'reference')}"
        )
    print(f"written {out}")
    if args.release is not None:
        charted = [out] + [
            f for f in sorted(RESULTS_DIR.glob("cpu-speed-*.json")) if f != out and "release:torch" in f.read_text()
        ]
        chart = RESULTS_DIR / "cpu-speed-vs-release.png"
        write_chart(charted, chart)
        print(f"written {chart}")
    return 0


SCALE_NOTES = {
    "tiny": "tiny DiT and umT5 + full-size Wan VAE, seeded random weights",
    "wan-1.3b": "wan-1.3b-shaped DiT (1.42B) + one-layer umT5 of width 4096 + full-size Wan VAE, seeded random weights",
}


def write_chart(result_files: list[Path], out: Path) -> None:
    """Medians per variant, one panel per scale; each bar stacked by stage, the VAE's part of each stage darker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(f).read_text()) for f in result_files]
    order = {name: i for i, name in enumerate(SCALES)}
    results.sort(key=lambda r: order.get(r["settings"].get("scale", "tiny"), 99))
    fig, axes = plt.subplots(1, len(results), figsize=(max(6.5, 5.2 * len(results)), 5.0), squeeze=False)
    stage_colors = ["#4c72b0", "#55a868", "#c44e52"]
    for ax, res in zip(axes[0], results):
        names = list(res["summary"])
        for i, name in enumerate(names):
            v = res["summary"][name]
            bottom = 0.0
            for st in v["stages"]:
                color = stage_colors[st["stage"] % len(stage_colors)]
                ax.bar(i, st["vae_seconds"], bottom=bottom, color=color, edgecolor="black", linewidth=0.4)
                bottom += st["vae_seconds"]
                other = max(st["seconds"] - st["vae_seconds"], 0.0)
                ax.bar(i, other, bottom=bottom, color=color, alpha=0.35, edgecolor="black", linewidth=0.4)
                bottom += other
            label = f"{v['seconds_median']:.1f} s"
            if "speedup_vs_release" in v:
                label += f"\n{v['speedup_vs_release']:.2f}x"
            ax.text(i, max(bottom, v["seconds_median"]) * 1.01, label, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("release:torch", "release").replace(":", "\n") for n in names], fontsize=8)
        st = res["settings"]
        ax.set_title(
            f"{st.get('scale', 'tiny')}: {st['height']}x{st['width']}, {st['num_frames']} frames, steps {st['steps']}\n"
            f"{st['threads']} threads, median of {st['repeats']}",
            fontsize=9,
        )
        ax.set_ylabel("seconds (loading excluded)")
        ax.margins(y=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=a) for c in stage_colors for a in (1.0, 0.35)]
    labels = [f"stage {k} {part}" for k in range(3) for part in ("VAE", "rest")]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("one generation on this CPU; ratio = release median / variant median", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


if __name__ == "__main__":
    raise SystemExit(main())
