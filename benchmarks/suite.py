"""The benchmark suite: every backend present, every op the stage plan uses, checked against a baseline.

    python -m benchmarks [--preset tiny] [--build DIR] [--engines DIR] [--height H --width W
        --num-frames N --intervals 4,2,1] [--steps 6,4,4] [--repeats 9] [--warmup 3]
        [--generate-repeats 5] [--sample-ms 200] [--threads 1] [--seed 0] [--runs 1] [--out FILE] [--record-baseline]
        [--check BASELINE] [--tolerance 0.15] [--plot FILE.png]
    python -m benchmarks --results RESULTS.json --check BASELINE   # check earlier results, no timing

Per backend (torch always; onnxruntime when installed; tensorrt with
--engines on a GPU, through `tempomaster.runtime.backends.tensorrt`): one DiT
call at every batch the stage plan uses (2 x chunks with guidance), one VAE
encode and one VAE decode of one chunk, the text encode, the whole
generation, and the runtime's own overhead (the share of the generation spent
outside backend calls). Medians of --repeats runs after --warmup runs, the
backends interleaved (alternating which goes first) so that machine load hits
them alike. Timing helpers, inputs and the export come from bench_backends.py.

The check compares figures that stay put on a shared, noisy machine because
both sides of each are measured in the same run: every op's time on each
backend relative to torch, the overhead share, and the generation's time
relative to the sum of its parts (the per-op medians times the calls the
stage plan makes). On a GPU the absolute per-op latencies are checked too,
against a baseline from the same GPU model. Every figure is "lower is
better"; one that exceeds the baseline's by more than --tolerance is named.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tempomaster.runtime.pipeline import DEFAULT_NEGATIVE_PROMPT, GenerationRequest, generate

from . import bench_backends as bb

BASELINES_DIR = Path(__file__).resolve().parent / "baselines"
DEFAULT_TOLERANCE = 0.15
# Absolute slack of the overhead-share figures (fraction of the generation's time).
SHARE_FLOOR = 0.01
# Order of preference; torch is the reference every ratio is taken against.
BACKEND_ORDER = ("torch", "onnxruntime", "tensorrt")
# What must match between a run and its baseline for the figures to compare.
CONFIG_KEYS = ("preset", "shape", "steps_per_stage", "precision", "threads")


class CheckError(Exception):
    """A baseline that cannot be compared with this run (another shape, preset, settings)."""


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        default="tiny",
        choices=["tiny", "toy"],
        help="model preset: tiny (random weights) or toy (the shipped trained toy; its results also measure "
        "each backend's video with tempomaster.toy.quality)",
    )
    p.add_argument("--build", type=Path, default=None, help="reuse this tm-export fp32 build instead of exporting one")
    p.add_argument(
        "--engines",
        type=Path,
        default=None,
        help="TensorRT engines directory (tm-export build); times the tensorrt backend on a GPU",
    )
    p.add_argument("--height", type=int, default=None, help="default: the build's, else the preset's")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--intervals", type=bb._ints, default=None, help="frame intervals, e.g. 4,2,1")
    p.add_argument("--steps", type=bb._ints, default=None, help="steps per stage (default: the preset's)")
    p.add_argument("--shifts", type=bb._floats, default=None, help="shift per stage (default: the preset's)")
    p.add_argument("--repeats", type=int, default=9, help="timed samples per op and backend")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per op and backend before timing")
    p.add_argument("--generate-repeats", type=int, default=5, help="timed whole generations per backend")
    p.add_argument(
        "--sample-ms",
        type=float,
        default=200.0,
        help="each timed sample of an op repeats it back to back for about this long (default 200)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of every backend (default 1: steadier on a shared machine); 0 = libraries' default",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the whole suite this many times; each figure is the median over the runs "
        "(use 3 or more to record a baseline on a shared machine)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: benchmarks/results/suite-<kind>-<date>.json)"
    )
    p.add_argument(
        "--record-baseline",
        action="store_true",
        help="also write the results as benchmarks/baselines/<machine-kind>.json",
    )
    p.add_argument(
        "--check",
        type=Path,
        default=None,
        metavar="BASELINE",
        help="compare with this baseline JSON; exit 1 naming every figure past --tolerance",
    )
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        metavar="FILE",
        help="check this earlier results JSON instead of measuring (with --check)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also draw the per-stage breakdown of each backend's generation (PNG; '{backend}' in the name "
        "is replaced, else one file per backend beside it)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="allowed relative increase of a figure over the baseline (default 0.15)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.generate_repeats < 1:
        p.error("--repeats and --generate-repeats must be >= 1, --warmup >= 0")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if args.tolerance < 0:
        p.error("--tolerance must be >= 0")
    if args.results is not None and args.check is None:
        p.error("--results needs --check BASELINE")
    return args


# ----------------------------------------------------------------------------
# Machine
# ----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = None
    try:
        import subprocess

        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except Exception:  # no nvidia-smi: the driver stays unknown, nothing else depends on it
        pass
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver,
        "cuda": torch.version.cuda,
        "capability": f"{props.major}.{props.minor}",
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def fingerprint() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": _gpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "libraries": {
            name: _version(name)
            for name in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt", "torch-tensorrt")
        },
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }


def machine_kind(fp: dict) -> str:
    """File-name key of a machine: its GPU model, else its CPU model and CPU count."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")  # noqa: E731
    if fp.get("gpu"):
        return f"gpu-{slug(fp['gpu']['name'])}"
    return f"cpu-{slug(fp['cpu_model'])}-{fp['cpu_affinity'] or fp['cpu_count']}cpu"


# ----------------------------------------------------------------------------
# Backends and inputs
# ----------------------------------------------------------------------------


def available_backends(models, build_dir: Path, threads: int, engines: Path | None) -> tuple[dict, dict]:
    """The backends this machine can run, and a note for each one it cannot."""
    from tempomaster.runtime.backends.torch import TorchBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends, skipped = {"torch": TorchBackend(models, device=device)}, {}
    try:
        from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

        backends["onnxruntime"] = OnnxRuntimeBackend.from_build(build_dir, threads=threads)
    except ImportError as err:
        skipped["onnxruntime"] = str(err)
    if engines is None:
        skipped["tensorrt"] = "no --engines given"
    elif not torch.cuda.is_available():
        skipped["tensorrt"] = "no CUDA GPU"
    else:
        try:  # the TensorRT backend class: timed like the others when the module is there
            from tempomaster.runtime.backends.tensorrt import TensorRTBackend
        except ImportError as err:
            skipped["tensorrt"] = f"tempomaster.runtime.backends.tensorrt unavailable: {err}"
        else:
            backends["tensorrt"] = TensorRTBackend.from_build(engines)
    return backends, skipped


def stage_batches(shape) -> dict[int, object]:
    """One stage per distinct chunk count (the last such stage): the DiT batches the plan uses."""
    out = {}
    for stage in shape.stages():
        out[stage.num_chunks] = stage
    return dict(sorted(out.items()))


def suite_inputs(info, tokenizer, shape, steps, shifts, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for n, stage in stage_batches(shape).items():
        s = stage.index
        inputs[f"dit_b{2 * n}"] = bb.dit_inputs(info, stage, shape, steps[s], shifts[s], gen)
    stage = bb.largest_stage(shape)
    ids, mask = tokenizer([bb.PROMPT, DEFAULT_NEGATIVE_PROMPT])
    inputs["vae_encode"] = {
        "video": torch.rand(1, 3, stage.chunk_frames, shape.height, shape.width, generator=gen) * 2 - 1
    }
    inputs["vae_decode"] = {
        "latents": torch.randn(
            1, info.z_dim, stage.latent_frames, shape.latent_height, shape.latent_width, generator=gen
        )
    }
    inputs["text"] = {"ids": ids, "mask": mask}
    return inputs


def on_device(inputs: dict, backend) -> dict:
    """The op's inputs where the backend keeps its tensors (the pipeline hands them over that way)."""
    return {k: v.to(backend.device) for k, v in inputs.items()}


def op_method(op: str) -> str:
    return "dit" if op.startswith("dit_b") else op


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def inner_calls(backends: dict, calls: dict, target_ms: float) -> int:
    """Calls per timed sample so that the fastest backend's sample lasts `target_ms`.

    On a shared machine an op shorter than the scheduler's time slice comes out
    bimodal (run whole, or cut by another process's slice); samples of many
    back-to-back calls average over slices instead."""
    fastest = min(bb.timed(backends[name], calls[name])[1] for name in calls)
    return max(1, math.ceil(target_ms / max(fastest, 1e-3)))


def bench_ops(backends: dict, inputs: dict, warmup: int, repeats: int, target_ms: float = 200.0) -> dict:
    names = tuple(backends)
    results = {}
    for op, op_inputs in inputs.items():
        single = {
            name: bb.op_call(backends[name], op_method(op), on_device(op_inputs, backends[name])) for name in names
        }
        for name in names:  # sessions, caches, first-call allocations: not timed
            single[name]()
        n = inner_calls(backends, single, target_ms)
        looped = {name: (lambda f=single[name], n=n: [f() for _ in range(n)][-1]) for name in names}
        raw = bb.bench_interleaved(backends, looped, warmup, repeats, names)
        for name in names:
            raw[name]["runs_ms"] = [ms / n for ms in raw[name]["runs_ms"]]
            raw[name]["first_call_ms"] /= n
        shapes = {k: list(v.shape) for k, v in op_inputs.items()}
        results[op] = bb.summarise(raw, {"inputs": shapes, "calls_per_sample": n}, names)
        print(f"  {op:<11} done ({n} call(s) per sample)", file=sys.stderr)
    return results


def part_weights(shape, steps, guided: bool) -> dict[str, int]:
    """How many one-chunk op calls a generation amounts to: text once, each chunk encoded and decoded once,
    a DiT call per step at the stage's batch."""
    weights = {"text": 1, "vae_encode": 0, "vae_decode": 0}
    for stage, n_steps in zip(shape.stages(), steps):
        n = stage.num_chunks
        weights["vae_encode"] += n
        weights["vae_decode"] += n
        op = f"dit_b{(2 if guided else 1) * n}"
        weights[op] = weights.get(op, 0) + n_steps
    return weights


def bench_generate(
    backends: dict,
    tokenizer,
    request_kwargs: dict,
    warmup: int,
    repeats: int,
    inputs: dict,
    weights: dict[str, int],
    per_sample: dict[str, int],
) -> dict:
    """Whole generations, interleaved across backends. Right after each, every op of the generation is
    timed once more (a sample of `per_sample[op]` back-to-back calls) and weighted by the calls the
    generation makes of it, so that "time / sum of parts" compares runs made under the same machine load."""
    names = tuple(backends)
    runs = {name: [] for name in names}
    parts = {name: [] for name in names}

    def sampled(fn, n):
        return lambda: [fn() for _ in range(n)][-1]

    calls = {
        name: {
            op: sampled(
                bb.op_call(backends[name], op_method(op), on_device(inputs[op], backends[name])), per_sample[op]
            )
            for op in weights
        }
        for name in names
    }
    for _ in range(warmup):
        for name in names:
            generate(backends[name], tokenizer, GenerationRequest(**request_kwargs), progress=False, keep_stages=False)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            bb.sync(backends[name])
            runs[name].append(
                generate(
                    backends[name], tokenizer, GenerationRequest(**request_kwargs), progress=False, keep_stages=False
                )
            )
            parts[name].append(
                sum(w * bb.timed(backends[name], calls[name][op])[1] / per_sample[op] for op, w in weights.items())
            )
    breakdowns = {}
    for name in names:  # one more, untimed, through the profiling wrapper: where the time went, per stage
        from tempomaster.runtime.profiling import GenerationProfile

        prof = GenerationProfile(backends[name].device)
        generate(
            prof.wrap(backends[name]), tokenizer, GenerationRequest(**request_kwargs), progress=False, keep_stages=False
        )
        breakdowns[name] = prof.breakdown()
    entry = {}
    for name in names:
        total = [res.seconds * 1e3 for res in runs[name]]
        inside = [res.backend_seconds * 1e3 for res in runs[name]]
        entry[name] = {
            "median_ms": statistics.median(total),
            "runs_ms": [round(v, 3) for v in total],
            "backend_median_ms": statistics.median(inside),
            "outside_share": statistics.median((t - b) / t for t, b in zip(total, inside)),
            "parts_ms": [round(v, 3) for v in parts[name]],
            "over_parts": statistics.median(t / p for t, p in zip(total, parts[name])),
            "dit_calls": runs[name][0].dit_calls,
            "breakdown": breakdowns[name],
        }
    return entry


# ----------------------------------------------------------------------------
# Figures and the check
# ----------------------------------------------------------------------------


def figures(data: dict) -> dict[str, float]:
    """Every checked figure, named; all are "lower is better"."""
    ops, gen = data["ops"], data["generate"]
    out = {}
    for op, entry in ops.items():
        for name in data["backends"]:
            if name != "torch":
                out[f"{op}: {name} / torch time"] = entry[name]["median_ms"] / entry["torch"]["median_ms"]
    for name in data["backends"]:
        out[f"generate: {name} overhead share"] = gen[name]["outside_share"]
        out[f"generate: {name} time / sum of parts"] = gen[name]["over_parts"]
    if data["machine"].get("gpu"):
        for op, entry in ops.items():
            for name in data["backends"]:
                out[f"{op}: {name} ms"] = entry[name]["median_ms"]
        for name in data["backends"]:
            out[f"generate: {name} ms"] = gen[name]["median_ms"]
    return out


def check(data: dict, baseline: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """One line per figure of `data` worse than `baseline`'s by more than `tolerance`.

    Absolute latencies count only against a baseline from the same GPU model;
    a figure the baseline lacks (a backend it did not have) or lists as
    unsteady (it varied past the tolerance across the baseline's own runs) is
    skipped.
    """
    for key in CONFIG_KEYS:
        if data["config"].get(key) != baseline["config"].get(key):
            raise CheckError(
                f"the baseline was measured with {key} = {baseline['config'].get(key)!r}, "
                f"this run with {data['config'].get(key)!r}: rerun with the baseline's settings"
            )
    same_gpu = (
        bool(data["machine"].get("gpu"))
        and (baseline["machine"].get("gpu") or {}).get("name") == data["machine"]["gpu"]["name"]
    )
    base = baseline["figures"]
    unsteady = baseline.get("unsteady", {})
    problems = []
    for name, value in data["figures"].items():
        if name not in base or name in unsteady or (name.endswith(" ms") and not same_gpu):
            continue
        limit = base[name] * (1 + tolerance)
        if name.endswith("share"):
            # a share of a few percent moves by a fraction of a point from run to run: one point of slack
            limit = max(limit, base[name] + SHARE_FLOOR)
        if value > limit:
            problems.append(
                f"{name}: {value:.4g} vs baseline {base[name]:.4g} (+{value / base[name] - 1:.0%}, "
                f"tolerance {tolerance:.0%})"
            )
    return problems


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def run(args, build_dir: Path, export_seconds: float | None, models) -> dict:
    from tempomaster.engines.manifest import load_manifest

    load_at_start = bb.load_average()
    manifest = load_manifest(build_dir)
    if manifest.preset != args.preset:
        raise SystemExit(f"{build_dir}: the build is for preset {manifest.preset!r}, not {args.preset!r}")
    shape = bb.resolve_shape(args, models.preset, manifest)
    n = len(shape.intervals)
    d = models.preset.defaults
    steps, shifts = bb.per_stage(args.steps, d.steps_per_stage, n), bb.per_stage(args.shifts, d.shift_per_stage, n)
    backends, skipped = available_backends(models, build_dir, args.threads, args.engines)
    if "onnxruntime" in backends:
        backends["onnxruntime"].check_request(shape.height, shape.width, shape.num_frames, shape.intervals)
    tokenizer = models.tokenizer
    print(
        f"backends {list(backends)}; shape {shape.height}x{shape.width}, {shape.num_frames} frames, intervals "
        f"{list(shape.intervals)}, steps {steps}; {args.repeats} runs after {args.warmup} warm-up",
        file=sys.stderr,
    )
    inputs = suite_inputs(backends["torch"].info, tokenizer, shape, steps, shifts, args.seed)
    ops = bench_ops(backends, inputs, args.warmup, args.repeats, args.sample_ms)
    prompt = bb.PROMPT
    if args.preset == "toy":
        from tempomaster.toy.showcase import QUICKSTART_PROMPT as prompt
    request = bb.request_fields(prompt, shape, steps, shifts, d, args.seed)
    weights = part_weights(shape, steps, d.guidance_scale != 1.0)
    # a quarter of the op samples' length: enough to average over time slices, short beside a generation
    per_sample = {op: max(1, math.ceil(ops[op]["calls_per_sample"] / 4)) for op in weights}
    gen = bench_generate(backends, tokenizer, request, 1, args.generate_repeats, inputs, weights, per_sample)
    print("  generate    done", file=sys.stderr)
    machine = fingerprint()
    machine.update(
        load_average_start=load_at_start, load_average_end=bb.load_average(), torch_threads=torch.get_num_threads()
    )
    data = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine_kind": machine_kind(machine),
        "config": {
            "preset": args.preset,
            "shape": shape.as_dict(),
            "steps_per_stage": steps,
            "precision": manifest.precision,
            "threads": args.threads,
        },
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "generate_repeats": args.generate_repeats,
            "sample_ms": args.sample_ms,
            "seed": args.seed,
            "shift_per_stage": shifts,
        },
        "build": {"dir": None if export_seconds is not None else str(build_dir), "export_seconds": export_seconds},
        "backends": list(backends),
        "skipped_backends": skipped,
        "machine": machine,
        "ops": {op: {k: v for k, v in e.items()} for op, e in ops.items()},
        "generate": gen,
    }
    if args.preset == "toy":
        data["quality"] = measure_quality(backends, tokenizer, request)
    data["figures"] = figures(data)
    return data


def measure_quality(backends: dict, tokenizer, request_kwargs: dict) -> dict:
    """What each backend's video of the toy shows (tempomaster.toy.quality): presence, smoothness, blueprint PSNR."""
    from tempomaster.toy.quality import measure_generation

    out = {}
    for name, backend in backends.items():
        result = generate(backend, tokenizer, GenerationRequest(**request_kwargs), progress=False, keep_stages=True)
        out[name] = measure_generation(result, request_kwargs["prompt"]).as_dict()
    return out


def report(data: dict) -> None:
    names = data["backends"]
    head = f"{'op':<12}" + "".join(f"{n + ' ms':>16}" for n in names)
    print(head + "\n" + "-" * len(head))
    for op, e in data["ops"].items():
        print(f"{op:<12}" + "".join(f"{e[n]['median_ms']:>16.2f}" for n in names))
    print(f"{'generate':<12}" + "".join(f"{data['generate'][n]['median_ms']:>16.2f}" for n in names))
    for name, value in data["figures"].items():
        print(f"  {name}: {value:.4g}")
    for name, why in data["skipped_backends"].items():
        print(f"  (not timed: {name}: {why})")


def main(argv: list[str] | None = None) -> int:
    from tempomaster.models.sources import load_model_set

    args = parse_args(argv)
    baseline = _read_json(args.check, "--check") if args.check is not None else None
    if args.results is not None:
        return _report_check(_read_json(args.results, "--results"), baseline, args)
    models = load_model_set(args.preset, None, None, torch.float32)
    torch_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="tm-bench-") as tmp:
            if args.build is not None:
                build_dir, export_seconds = args.build, None
            else:
                build_dir = Path(tmp) / "build"
                print(f"exporting {args.preset} (fp32) to {build_dir} ...", file=sys.stderr)
                export_seconds = bb.export_build(models, bb.resolve_shape(args, models.preset), build_dir)
            runs = []
            for k in range(args.runs):
                if args.runs > 1:
                    print(f"run {k + 1} of {args.runs}", file=sys.stderr)
                runs.append(run(args, build_dir, export_seconds, models))
            data = merge_runs(runs, args.tolerance)
    finally:
        torch.set_num_threads(torch_threads)
    out = args.out or bb.RESULTS_DIR / f"suite-{data['machine_kind']}-{time.strftime('%Y-%m-%d')}.json"
    bb.write_json(data, out)
    report(data)
    print(f"wrote {out}")
    if args.record_baseline:
        path = BASELINES_DIR / f"{data['machine_kind']}.json"
        bb.write_json(data, path)
        print(f"wrote baseline {path}")
    if args.plot is not None:
        for path in plot_results(data, args.plot):
            print(f"wrote {path}")
    return _report_check(data, baseline, args) if baseline is not None else 0


def unsteady_figures(figure_runs: list[dict], tolerance: float) -> dict[str, float]:
    """Figures whose spread over whole runs (max / min - 1) passes `tolerance`: this machine cannot hold them."""
    out = {}
    for name in figure_runs[-1]:
        values = [r[name] for r in figure_runs]
        spread = max(values) / min(values) - 1 if min(values) > 0 else float("inf")
        if name.endswith("share") and max(values) - min(values) <= SHARE_FLOOR:
            continue  # within the shares' own slack
        if spread > tolerance:
            out[name] = round(spread, 4)
    return out


def merge_runs(runs: list[dict], tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The last run's results with every figure the median over all runs (each run's figures kept).

    With several runs, the figures that varied across them by more than
    `tolerance` are listed as "unsteady": a check against this baseline
    names them but does not fail on them.
    """
    data = dict(runs[-1])
    if len(runs) > 1:
        data["figure_runs"] = [r["figures"] for r in runs]
        data["figures"] = {name: statistics.median(r["figures"][name] for r in runs) for name in runs[-1]["figures"]}
        data["unsteady"] = unsteady_figures(data["figure_runs"], tolerance)
    data["settings"] = dict(data["settings"], runs=len(runs))
    return data


def _read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {flag} {path}: {err}") from None


def plot_results(data: dict, path: Path) -> list[Path]:
    """The per-stage breakdown of each backend's generation as a bar chart (runtime/profiling.py's)."""
    from tempomaster.runtime.profiling import plot_breakdown

    out = []
    for name in data["backends"]:
        breakdown = data["generate"][name].get("breakdown")
        if not breakdown:
            continue
        if "{backend}" in path.name:
            target = path.with_name(path.name.replace("{backend}", name))
        else:
            target = path.with_name(f"{path.stem}-{name}{path.suffix or '.png'}")
        out.append(
            plot_breakdown(
                breakdown, target, title=f"{data['config']['preset']} preset, {name} ({data['machine_kind']})"
            )
        )
    return out


def _report_check(data: dict, baseline: dict, args) -> int:
    try:
        problems = check(data, baseline, args.tolerance)
    except CheckError as err:
        print(f"error: {args.check}: {err}", file=sys.stderr)
        return 2
    if problems:
        print(f"REGRESSED against {args.check} ({len(problems)}):")
        for line in problems:
            print(f"  {line}")
        for name, spread in baseline.get("unsteady", {}).items():
            print(f"  not checked: {name} (varied {spread:.0%} across the baseline's own runs)")
        return 1
    unsteady = baseline.get("unsteady", {})
    for name, spread in unsteady.items():
        print(f"  not checked: {name} (varied {spread:.0%} across the baseline's own runs)")
    print(f"check against {args.check}: {len(data['figures']) - len(unsteady)} figures within {args.tolerance:.0%}")
    return 0
