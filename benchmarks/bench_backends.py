"""Time the torch and onnxruntime backends side by side on the same inputs.

    python benchmarks/bench_backends.py [--preset tiny] [--height H --width W --num-frames N]
        [--intervals 4,2,1] [--steps 6,4,4] [--shifts 5,3,3] [--repeats 10] [--warmup 2]
        [--generate-repeats 3] [--threads N] [--seed 0] [--build DIR] [--out results.json]

Ops timed (each the median of --repeats runs after --warmup runs, the two
backends' runs interleaved, alternating which goes first, so machine load
affects both alike; the first call of each op is the agreement check and is
never timed):

    dit         one DiT call on the largest stage's batch: 2 x chunks (cond + uncond),
                the stage's real RoPE table and first timestep
    vae_decode  one chunk: [1, 16, f, h, w] latents
    vae_encode  one chunk: [1, 3, L, H, W] frames
    text        encode_text on [2, text_len] ids/mask (prompt + negative prompt)
    generate    the whole generation (--generate-repeats runs), with the share of
                time spent outside backend calls

Inputs are drawn from one seeded generator and handed to both backends
unchanged; the relative error ||ort - torch|| / ||torch|| of every op is
printed next to its times. Without --build the preset is exported (fp32) to a
temporary folder first; the export time is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tempomaster.rope import batched_rope_table
from tempomaster.runtime.pipeline import DEFAULT_NEGATIVE_PROMPT, GenerationRequest, generate
from tempomaster.runtime.schedule import StageSchedule, model_timestep

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS = ("torch", "onnxruntime")
PROMPT = "a red ball bouncing on a beach"
# ||ort - torch|| / ||torch|| above this (fp32 build) means the timings do not compare like with like.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "bf16": 5e-2}


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the torch and onnxruntime backends side by side.")
    p.add_argument(
        "--preset", default="tiny", choices=["tiny"], help="model preset (random weights, nothing downloaded)"
    )
    p.add_argument("--height", type=int, default=None, help="default: the build's, else the preset's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--intervals", type=_ints, default=None, help="frame intervals, e.g. 4,2,1")
    p.add_argument("--steps", type=_ints, default=None, help="steps per stage for generate (default: the preset's)")
    p.add_argument("--shifts", type=_floats, default=None, help="shift per stage for generate (default: the preset's)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per op and backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per op and backend before timing")
    p.add_argument("--generate-repeats", type=int, default=3, help="timed whole-generation runs per backend")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for both backends (torch.set_num_threads and onnxruntime's intra-op pool); "
        "default: each library's own default",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--build", type=Path, default=None, help="reuse this tm-export build instead of exporting one")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON file (default: benchmarks/results/<preset>-<date>.json)"
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.generate_repeats < 1:
        p.error("--repeats and --generate-repeats must be >= 1, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


# ----------------------------------------------------------------------------
# Setup: models, build, backends, shape
# ----------------------------------------------------------------------------


def resolve_shape(args, preset, manifest=None):
    """ExportShape from the flags, falling back to the build's shape, then the preset's defaults."""
    from tempomaster.export.shapes import ExportShape

    base = manifest.shape if manifest is not None else None
    pick = lambda flag, key: flag if flag is not None else (base[key] if base else None)  # noqa: E731
    shape = ExportShape.from_preset(
        preset,
        height=pick(args.height, "height"),
        width=pick(args.width, "width"),
        num_frames=pick(args.num_frames, "num_frames"),
        intervals=pick(args.intervals, "intervals"),
    )
    shape.validate()
    return shape


def per_stage(values, defaults, n: int) -> list:
    """Per-stage settings: the flag's, else the preset's cut (or padded with its last value) to n stages."""
    values = list(values if values is not None else defaults)
    if len(values) < n:
        values += [values[-1]] * (n - len(values))
    return values[:n]


def export_build(models, shape, out_dir: Path) -> float:
    """Export every graph at fp32 for `shape`; returns the seconds it took."""
    from tempomaster.export.build import export_onnx

    start = time.perf_counter()
    export_onnx(models, "fp32", shape, out_dir, preset_name=models.preset.name, progress=False)
    return time.perf_counter() - start


def make_backends(models, build_dir: Path, threads: int | None = None) -> dict:
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from tempomaster.runtime.backends.torch import TorchBackend

    if threads is not None:
        torch.set_num_threads(threads)
    ort_backend = OnnxRuntimeBackend.from_build(build_dir, threads=threads or 0)
    return {"torch": TorchBackend(models), "onnxruntime": ort_backend}


def largest_stage(shape):
    """The stage with the most chunks (the biggest DiT batch); the last one on ties."""
    stages = shape.stages()
    return max(reversed(stages), key=lambda s: s.num_chunks)


# ----------------------------------------------------------------------------
# Inputs (one seeded generator, the same tensors for both backends)
# ----------------------------------------------------------------------------


def dit_inputs(info, stage, shape, steps: int, shift: float, gen: torch.Generator) -> dict:
    """One DiT call as the pipeline makes it: cond and uncond twins of every chunk in one batch."""
    n, f, h, w = stage.num_chunks, stage.latent_frames, shape.latent_height, shape.latent_width
    x = torch.randn(n, info.z_dim, f, h, w, generator=gen)
    latents = torch.randn(n, info.z_dim, f, h, w, generator=gen)
    mask = stage.latent_masks()[:, :, :, None, None].expand(n, 4, f, h, w)
    y = torch.cat([mask, latents], dim=1)
    context = torch.randn(1, info.text_len, info.text_dim, generator=gen).expand(n, -1, -1)
    negative = torch.randn(1, info.text_len, info.text_dim, generator=gen).expand(n, -1, -1)
    _, ph, pw = info.patch_size
    cos, sin = batched_rope_table(stage.rope_table().tolist(), h // ph, w // pw, info.head_dim)
    timestep = model_timestep(StageSchedule.create(steps, shift).timestep(0), info.dit_dtype, False)
    return {
        "x": torch.cat([x, x]),
        "y": torch.cat([y, y]),
        "timestep": timestep,
        "context": torch.cat([context, negative]).contiguous(),
        "rope_cos": torch.cat([cos, cos]),
        "rope_sin": torch.cat([sin, sin]),
    }


def make_inputs(info, tokenizer, shape, steps, shifts, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    stage = largest_stage(shape)
    s = stage.index
    ids, mask = tokenizer([PROMPT, DEFAULT_NEGATIVE_PROMPT])
    return {
        "dit": dit_inputs(info, stage, shape, steps[s], shifts[s], gen),
        "vae_decode": {
            "latents": torch.randn(
                1, info.z_dim, stage.latent_frames, shape.latent_height, shape.latent_width, generator=gen
            )
        },
        "vae_encode": {"video": torch.rand(1, 3, stage.chunk_frames, shape.height, shape.width, generator=gen) * 2 - 1},
        "text": {"ids": ids, "mask": mask},
    }


def op_call(backend, op: str, inputs: dict) -> Callable[[], torch.Tensor]:
    method = {
        "dit": backend.velocity,
        "vae_decode": backend.vae_decode,
        "vae_encode": backend.vae_encode,
        "text": backend.encode_text,
    }[op]
    return lambda: method(**inputs)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def sync(backend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def timed(backend, fn: Callable):
    """(result, milliseconds) of one call, the device synchronised on both sides."""
    sync(backend)
    start = time.perf_counter()
    out = fn()
    sync(backend)
    return out, (time.perf_counter() - start) * 1e3


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-12))


def bench_interleaved(backends: dict, calls: dict, warmup: int, repeats: int, names=BACKENDS) -> dict:
    """Per backend: first-call time and output, then the times of `repeats` interleaved runs."""
    names = tuple(names)
    result = {}
    for name in names:  # first call: sessions are created, outputs kept for the agreement check
        out, ms = timed(backends[name], calls[name])
        result[name] = {"output": out, "first_call_ms": ms, "runs_ms": []}
    for _ in range(warmup):
        for name in names:
            calls[name]()
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            _, ms = timed(backends[name], calls[name])
            result[name]["runs_ms"].append(ms)
    return result


def summarise(raw: dict, extra: dict | None = None, names=BACKENDS) -> dict:
    entry = {}
    for name in names:
        runs = raw[name]["runs_ms"]
        entry[name] = {
            "median_ms": statistics.median(runs),
            "runs_ms": [round(v, 3) for v in runs],
            "first_call_ms": round(raw[name]["first_call_ms"], 3),
        }
    if "onnxruntime" in entry:
        entry["ratio_torch_over_ort"] = entry["torch"]["median_ms"] / entry["onnxruntime"]["median_ms"]
    for name in names:
        if name != "torch":
            entry.setdefault("rel_error_vs_torch", {})[name] = relative_error(
                raw[name]["output"], raw["torch"]["output"]
            )
    if "onnxruntime" in entry:
        entry["rel_error"] = entry["rel_error_vs_torch"]["onnxruntime"]
    entry.update(extra or {})
    return entry


def bench_ops(backends: dict, inputs: dict, warmup: int, repeats: int) -> dict:
    results = {}
    for op, op_inputs in inputs.items():
        calls = {name: op_call(backends[name], op, op_inputs) for name in BACKENDS}
        raw = bench_interleaved(backends, calls, warmup, repeats)
        shapes = {k: list(v.shape) for k, v in op_inputs.items()}
        results[op] = summarise(raw, {"inputs": shapes})
        print(f"  {op:<11} done (rel error {results[op]['rel_error']:.2e})", file=sys.stderr)
    return results


def request_fields(prompt: str, shape, steps, shifts, defaults, seed: int) -> dict:
    """The GenerationRequest fields of one timed generation at `shape` (the preset's guidance and APG)."""
    return dict(
        prompt=prompt,
        **shape.request_fields(),
        steps_per_stage=tuple(steps),
        shift_per_stage=tuple(shifts),
        guidance_scale=defaults.guidance_scale,
        use_apg=defaults.use_apg,
        seed=seed,
    )


def bench_generate(backends: dict, tokenizer, request_kwargs: dict, repeats: int) -> dict:
    """Whole generations, interleaved; also the share of the time spent outside backend calls."""
    runs = {name: [] for name in BACKENDS}
    videos = {}
    for r in range(repeats):
        order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
        for name in order:
            result = generate(
                backends[name], tokenizer, GenerationRequest(**request_kwargs), progress=False, keep_stages=False
            )
            runs[name].append(result)
            videos[name] = result.video.frames
    entry = {}
    for name in BACKENDS:
        total = [res.seconds * 1e3 for res in runs[name]]
        inside = [res.backend_seconds * 1e3 for res in runs[name]]
        outside_share = [(t - b) / t for t, b in zip(total, inside)]
        entry[name] = {
            "median_ms": statistics.median(total),
            "runs_ms": [round(v, 3) for v in total],
            "backend_median_ms": statistics.median(inside),
            "outside_share": statistics.median(outside_share),
            "dit_calls": runs[name][0].dit_calls,
        }
    entry["ratio_torch_over_ort"] = entry["torch"]["median_ms"] / entry["onnxruntime"]["median_ms"]
    entry["rel_error"] = relative_error(videos["onnxruntime"], videos["torch"])
    entry["max_abs_error"] = float((videos["onnxruntime"] - videos["torch"]).abs().max())
    entry["video_shape"] = list(videos["torch"].shape)
    return entry


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(backends: dict, load_at_start) -> dict:
    import onnxruntime as ort

    ort_backend = backends["onnxruntime"]
    session = ort_backend.graphs["dit"].session
    intra = session.get_session_options().intra_op_num_threads
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": load_at_start,  # 1, 5, 15 minutes
        "load_average_end": load_average(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "ort_providers": ort_backend.providers,
        "ort_intra_op_threads": intra if intra else "default (0: one per physical core)",
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ORT_NUM_THREADS") if k in os.environ},
    }


def format_table(ops: dict) -> str:
    lines = [f"{'op':<12}{'torch ms':>12}{'onnxruntime ms':>16}{'torch/ort':>11}{'rel error':>11}"]
    lines.append("-" * len(lines[0]))
    for op, e in ops.items():
        lines.append(
            f"{op:<12}{e['torch']['median_ms']:>12.2f}{e['onnxruntime']['median_ms']:>16.2f}"
            f"{e['ratio_torch_over_ort']:>11.2f}{e['rel_error']:>11.1e}"
        )
    return "\n".join(lines)


def write_json(data: dict, path: Path) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a results file should keep
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def run(args, build_dir: Path, export_seconds: float | None, models) -> dict:
    from tempomaster.engines.manifest import load_manifest

    load_at_start = load_average()
    manifest = load_manifest(build_dir)
    if manifest.preset != args.preset:
        raise SystemExit(f"{build_dir}: the build is for preset {manifest.preset!r}, not {args.preset!r}")
    shape = resolve_shape(args, models.preset, manifest)
    n = len(shape.intervals)
    d = models.preset.defaults
    steps, shifts = per_stage(args.steps, d.steps_per_stage, n), per_stage(args.shifts, d.shift_per_stage, n)
    backends = make_backends(models, build_dir, args.threads)
    backends["onnxruntime"].check_request(shape.height, shape.width, shape.num_frames, shape.intervals)
    tokenizer = models.tokenizer

    print(
        f"shape {shape.height}x{shape.width}, {shape.num_frames} frames, intervals {list(shape.intervals)}, "
        f"steps {steps}; {args.repeats} runs after {args.warmup} warm-up",
        file=sys.stderr,
    )
    inputs = make_inputs(backends["torch"].info, tokenizer, shape, steps, shifts, args.seed)
    ops = bench_ops(backends, inputs, args.warmup, args.repeats)
    request = request_fields(PROMPT, shape, steps, shifts, d, args.seed)
    ops["generate"] = bench_generate(backends, tokenizer, request, args.generate_repeats)
    print("  generate    done", file=sys.stderr)

    tolerance = TOLERANCE[manifest.precision]
    return {
        "preset": args.preset,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shape": shape.as_dict(),
        "steps_per_stage": steps,
        "shift_per_stage": shifts,
        "dit_stage": largest_stage(shape).index,
        "build": {
            "dir": None if export_seconds is not None else str(build_dir),
            "precision": manifest.precision,
            "export_seconds": export_seconds,
        },
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "generate_repeats": args.generate_repeats,
            "seed": args.seed,
            "threads": args.threads,
        },
        "machine": machine_info(backends, load_at_start),
        "tolerance": tolerance,
        "agree": all(e["rel_error"] <= tolerance for e in ops.values()),
        "ops": ops,
    }


def report(data: dict) -> None:
    print(format_table(data["ops"]))
    g = data["ops"]["generate"]
    print(
        f"generate: outside backend calls torch {g['torch']['outside_share']:.1%}, "
        f"onnxruntime {g['onnxruntime']['outside_share']:.1%}; {g['torch']['dit_calls']} DiT calls"
    )
    if data["build"]["export_seconds"] is not None:
        print(f"export ({data['build']['precision']}, not in the table): {data['build']['export_seconds']:.1f} s")
    m = data["machine"]
    print(
        f"machine: {m['cpu_count']} CPUs, load {m['load_average_start']} -> {m['load_average_end']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}"
    )
    if not data["agree"]:
        bad = [op for op, e in data["ops"].items() if e["rel_error"] > data["tolerance"]]
        print(f"WARNING: the backends disagree on {bad} (relative error above {data['tolerance']:g})")


def main(argv: list[str] | None = None) -> int:
    from tempomaster.models.tiny import build_tiny_models

    args = parse_args(argv)
    models = build_tiny_models()
    torch_threads = torch.get_num_threads()  # --threads changes it for this run only
    with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
        if args.build is not None:
            build_dir, export_seconds = args.build, None
        else:
            build_dir = Path(tmp) / "build"
            shape = resolve_shape(args, models.preset)
            print(f"exporting {args.preset} (fp32) to {build_dir} ...", file=sys.stderr)
            export_seconds = export_build(models, shape, build_dir)
        try:
            data = run(args, build_dir, export_seconds, models)
        finally:
            torch.set_num_threads(torch_threads)
    out = args.out or RESULTS_DIR / f"{args.preset}-{time.strftime('%Y-%m-%d')}.json"
    write_json(data, out)
    report(data)
    print(f"wrote {out}")
    return 0 if data["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
