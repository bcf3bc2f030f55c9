"""`tm-export`: checkpoints -> ONNX -> TensorRT. Flags become typed values and one library call each."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..build_format import GRAPH_NAMES as GRAPHS
from .common import (
    OneLineParser,
    add_model_source,
    add_shape,
    bounded_int,
    number_list,
    run_command,
)

PROG = "tm-export"


def _add_export_target(
    p: argparse.ArgumentParser, precision: str, precision_help: str, out_help: str, *, out_required: bool
) -> None:
    """The model source, --precision, the shape and --out (tm-export onnx and build)."""
    add_model_source(p)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "fp8"], default=precision, help=precision_help)
    add_shape(p, "the build serves (default: the preset's)")
    p.add_argument("--out", type=Path, required=out_required, help=out_help)


def _add_onnx_flags(p: argparse.ArgumentParser) -> None:
    """What the ONNX export takes beyond the model source, shape and --out (tm-export onnx and build)."""
    p.add_argument(
        "--opset", type=bounded_int(23), default=23, help="ONNX opset (>= 23 for Attention and RMSNormalization)"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="seeded random weights for the preset (no checkpoints; for sizing and tests)",
    )
    p.add_argument(
        "--t5-precision",
        choices=["fp32", "bf16"],
        help="precision of the T5 graph (default: fp32 for fp32 builds, else bf16)",
    )
    p.add_argument("--graphs", type=lambda s: s.split(","), help=f"comma-separated subset of {','.join(GRAPHS)}")
    p.add_argument(
        "--tile",
        action="store_true",
        help="export the VAE graphs at the release's tile shape (240x416 pixels at 480x832, cut to the frame "
        "when smaller) for tm-run generate --tile; recorded in the manifest",
    )
    _add_fp8_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_calibration_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-prompts",
        type=Path,
        metavar="FILE",
        help="calibration prompts, one per line (# comments; FRAME:PATH[,FRAME:PATH]|prompt adds reference "
        "images); default: the 36 built-in prompts",
    )
    p.add_argument(
        "--calib-steps",
        type=number_list("--calib-steps", int, "10 or 10,6,6"),
        metavar="N|N,N,N",
        help="denoising steps per stage while calibrating (default: the --calib-set's share of the "
        "preset's); fewer steps cover the same noise levels more coarsely",
    )
    p.add_argument(
        "--calib-set",
        choices=["small", "full"],
        default="small",
        help="small (default): 4 built-in prompts at a quarter of the preset's steps (on the toy: mean "
        "amax within 10%% of the full set's, the same velocity error; benchmarks/calibration_convergence.py); "
        "full: all 36 at every step",
    )
    p.add_argument(
        "--seed", type=bounded_int(0, 2**63 - 1), default=0, help="calibration video i uses seed + i (default 0)"
    )
    p.add_argument(
        "--report-prompts",
        type=bounded_int(0),
        default=4,
        help="held-out prompts for the FP8 quality report (0: no report; default 4)",
    )


def _add_fp8_flags(p: argparse.ArgumentParser) -> None:
    _add_calibration_flags(p)
    p.add_argument(
        "--fp8-base",
        choices=["bf16", "fp16"],
        default="bf16",
        help="--precision fp8: the dtype of everything not quantized, and of the Q/DQ scales (default bf16)",
    )
    p.add_argument(
        "--fp8-weight-scale",
        choices=["tensor", "channel"],
        default="tensor",
        help="--precision fp8: one scale per weight tensor (TensorRT's documented FP8 GEMM fusion) or per output channel",
    )
    p.add_argument(
        "--fp8-skip-blocks",
        metavar="LIST",
        help="--precision fp8: transformer blocks kept in high precision, e.g. 0,1,28-29 (negative: from the end)",
    )
    p.add_argument(
        "--fp8-attention",
        choices=["on", "off"],
        default=None,
        help="--precision fp8: FP8 q, k, v (calibrated Q/DQ; q and k smoothed and rotated first) into every "
        "self-attention (default on: on the trained toy it keeps every held-out prompt that passes "
        "unquantized; docs/export.md)",
    )
    p.add_argument(
        "--fp8-cross-attention",
        choices=["on", "off"],
        default="off",
        help="--precision fp8: FP8 q, k, v into every cross-attention too (default off: over 512 text "
        "tokens it is ~1%% of the attention FLOPs at 480x832)",
    )
    p.add_argument(
        "--fp8-twin",
        action="store_true",
        help="--precision fp8: an fp32-based twin (same Q/DQ and scales) that onnxruntime's CPU provider can run",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="--precision fp8: use BUILD/calibration (or --calibration) instead of calibrating now",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="PATH",
        help="--precision fp8: an amax.json, a calibration folder or a build folder to take the scales from",
    )


FP8_ONLY = (
    "fp8_weight_scale",
    "fp8_skip_blocks",
    "fp8_twin",
    "no_calibrate",
    "calibration",
    "calib_prompts",
    "calib_steps",
)


def _export_source(args):
    """The ExportSource of the model source, shape and ONNX flags this subcommand has."""
    from dataclasses import fields

    from ..export.source import ExportSource

    return ExportSource(**{f.name: getattr(args, f.name) for f in fields(ExportSource) if hasattr(args, f.name)})


def _calibration_fields(args) -> dict:
    """The calibration flags (tm-export calibrate, and onnx/build --precision fp8) as FP8Options fields."""
    from ..calibration.export import CALIBRATION_FIELDS

    return {k: getattr(args, "calib_prompts" if k == "prompts" else k) for k in CALIBRATION_FIELDS}


def _fp8_options(args):
    """The FP8Options of --precision fp8; None (and no fp8 flag given) otherwise."""
    from ..calibration.export import FP8Options
    from ..errors import UsageError

    if args.precision != "fp8":
        given = [f"--{k.replace('_', '-')}" for k in FP8_ONLY if getattr(args, k) not in (None, False, "tensor")]
        if args.fp8_base != "bf16":
            given.append("--fp8-base")
        if args.calib_set != "small":
            given.append("--calib-set")
        if args.fp8_attention is not None:
            given.append("--fp8-attention")
        if args.fp8_cross_attention != "off":
            given.append("--fp8-cross-attention")
        if given:
            raise UsageError(f"{', '.join(given)}: only with --precision fp8")
        return None
    from ..calibration.fp8 import SELF_ATTENTION_DEFAULT

    return FP8Options(
        calibration=args.calibration,
        calibrate_now=not args.no_calibrate,
        **_calibration_fields(args),
        base=args.fp8_base,
        weight_scale=args.fp8_weight_scale,
        skip_blocks=args.fp8_skip_blocks,
        twin=args.fp8_twin,
        attention=SELF_ATTENTION_DEFAULT if args.fp8_attention is None else args.fp8_attention == "on",
        cross_attention=args.fp8_cross_attention == "on",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Export TempoMaster's models: checkpoints -> ONNX -> TensorRT")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("init-tiny", help="write the tiny preset's checkpoint set in the release's layout")
    p.add_argument("--out", type=Path, required=True, help="new directory to create")
    p.add_argument(
        "--seed", type=bounded_int(0, 2**63 - 1), default=None, help="weight seed (default: the tiny preset's own)"
    )

    p = sub.add_parser(
        "train-toy", help="train the toy preset on synthetic clips (CPU, about 60 minutes on 2 cores; resumable)"
    )
    p.add_argument(
        "--work",
        type=Path,
        required=True,
        help="folder for checkpoints, cached tasks and the loss log (rerun to resume)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where the trained set goes, in the release's layout (replaced when done)",
    )
    p.add_argument(
        "--seed",
        type=bounded_int(0, 2**63 - 1),
        default=None,
        help="seed of every random draw (default: the shipped toy's)",
    )
    p.add_argument("--vae-steps", type=bounded_int(1), default=None, help="VAE optimiser steps (default 1500)")
    p.add_argument(
        "--clips", type=bounded_int(1), default=None, help="synthetic clips whose tasks train the DiT (default 1000)"
    )
    p.add_argument("--dit-steps", type=bounded_int(1), default=None, help="DiT optimiser steps (default 11000)")
    p.add_argument("--loss-png", type=Path, default=None, help="also write the loss curves (needs matplotlib)")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="train the DiT without torch.compile (slower; compiling needs a C++ compiler, and falls back to this without one)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser(
        "inspect",
        help="load all three models and print their sizes; with BUILD, its DiT's FLOPs (FP8 "
        "and 16-bit) and, when it has plans, each plan's FP8 layers",
    )
    p.add_argument(
        "build",
        nargs="?",
        type=Path,
        metavar="BUILD",
        help="a tm-export build: the FLOPs of one DiT call split into FP8 and 16-bit, read off dit.onnx, and "
        "which FP8-quantized layers each TensorRT plan runs in FP8 (engine inspector)",
    )
    add_model_source(p)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype to load the models in")

    p = sub.add_parser("onnx", help="export the DiT, VAE encoder/decoder steps and umT5 to ONNX")
    _add_export_target(
        p,
        "fp32",
        "the graphs' dtype (TensorRT 11 networks are strongly typed); fp8: a calibrated Q/DQ DiT",
        "build directory: new, empty or an earlier tm-export build, replaced only when the export "
        "completes (any other folder is refused)",
        out_required=True,
    )
    _add_onnx_flags(p)

    p = sub.add_parser("build", help="export the ONNX, then build one TensorRT plan per graph (or --resume BUILD)")
    _add_export_target(
        p,
        "bf16",
        "the graphs' dtype; TensorRT 11 networks are strongly typed, so this decides the engines' precision",
        "build directory: new, empty or an earlier tm-export build (any other folder is refused); "
        "required unless --resume",
        out_required=False,
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="BUILD",
        help="reuse the hash-checked ONNX of BUILD (from a build that stopped at exit 3, or tm-export onnx) and build the plans",
    )
    p.add_argument(
        "--opt-level", type=bounded_int(0, 5), default=None, help="TensorRT builder optimization level 0..5 (default 3)"
    )
    p.add_argument(
        "--workspace",
        default=None,
        metavar="SIZE",
        help="workspace memory pool limit, e.g. 8GiB (default: TensorRT's, all device memory)",
    )
    p.add_argument(
        "--weight-streaming",
        action="store_true",
        default=None,
        help="build plans whose weights can stream from host memory (GPUs that cannot hold the DiT)",
    )
    p.add_argument(
        "--hardware-compat",
        choices=["none", "same-cc", "ampere+"],
        default=None,
        help="none (default): plans for this GPU model; same-cc: for every GPU of this compute capability; "
        "ampere+: for every GPU of compute capability 8.0 and later (FP8 plans still need 8.9+)",
    )
    p.add_argument(
        "--version-compatible", action="store_true", default=None, help="plans that run on later TensorRT 11.x"
    )
    p.add_argument(
        "--strip-weights",
        action="store_true",
        default=None,
        help="plans without weights, refitted from the build's ONNX when loaded (no second copy on disk)",
    )
    p.add_argument("--verbose", action="store_true", default=None, help="TensorRT's INFO and VERBOSE messages too")
    _add_onnx_flags(p)

    p = sub.add_parser(
        "check",
        help="run each graph of a build on two runners with the same random inputs (polygraphy) "
        "and print per output the max/mean absolute and relative errors; exit 1 when one fails",
    )
    p.add_argument("build", type=Path, metavar="BUILD", help="a tm-export build")
    p.add_argument(
        "--graphs", nargs="+", metavar="NAME", help="the graphs to check (default: every graph of the build)"
    )
    p.add_argument(
        "--runner",
        choices=["onnxruntime", "tensorrt"],
        default="onnxruntime",
        help="onnxruntime (default): BUILD's graphs against --reference's, both on onnxruntime; tensorrt: "
        "BUILD's plans against its own ONNX on onnxruntime (a GPU with TensorRT)",
    )
    p.add_argument(
        "--reference",
        type=Path,
        metavar="REF",
        help="the build to compare with on onnxruntime: the fp32 build of the same models, or an fp8 build's --fp8-twin",
    )
    p.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=0, help="seed of the random inputs (default 0)")
    p.add_argument(
        "--error-stat", choices=["max", "mean"], help="the statistic judged (default: the pair's stated one)"
    )
    p.add_argument("--atol", type=float, help="absolute tolerance (default: the pair's stated one)")
    p.add_argument("--rtol", type=float, help="relative tolerance (default: the pair's stated one)")
    p.add_argument(
        "--verbose", action="store_true", help="polygraphy's own log: every input, output and error statistic"
    )

    p = sub.add_parser("calibrate", help="FP8 calibration alone: amax over whole generations into BUILD/calibration/")
    add_model_source(p)
    add_shape(p, "the build serves (default: the preset's)")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="build directory (new, empty or a tm-export build); writes BUILD/calibration/",
    )
    _add_calibration_flags(p)
    p.add_argument(
        "--calib-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype the models run in while calibrating (default fp32; bf16 as the deployed DiT sees it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _init_tiny(args) -> int:
    from ..models.tiny import TINY_SEED, write_tiny_checkpoints

    out = write_tiny_checkpoints(args.out, seed=TINY_SEED if args.seed is None else args.seed)
    print(f"tiny checkpoint set written to {out} (config: {out / 'inference_configs.json'})")
    return 0


def _train_toy(args) -> int:
    from dataclasses import replace

    from ..toy.train import ToyTrainConfig, plot_losses, require_matplotlib, train_toy

    if args.loss_png is not None:
        require_matplotlib()
    given = {"seed": args.seed, "vae_steps": args.vae_steps, "clips": args.clips, "dit_steps": args.dit_steps}
    cfg = replace(ToyTrainConfig(), **{k: v for k, v in given.items() if v is not None})
    train_toy(args.work, args.out, cfg, progress=not args.no_progress, compile_dit=not args.no_compile)
    if args.loss_png is not None:
        print(f"loss curves written to {plot_losses(args.work, args.loss_png)}")
    return 0


def _inspect_plans(build: Path) -> int:
    from ..engines.layer_report import describe_report
    from ..engines.manifest import load_manifest
    from ..engines.plans import engines_section
    from ..errors import UsageError

    section = engines_section(load_manifest(build))
    if section is None:
        raise UsageError(
            f"{build}: the build has no TensorRT plans (tm-export build --resume {build} on a GPU machine)"
        )
    print(
        f"{build}: TensorRT {section['tensorrt_version']} plans built on {section['gpu']} (compute capability {section['compute_capability']})"
    )
    for name, plan in section["plans"].items():
        if "fp8_layers" in plan or plan.get("precision") == "fp8":
            print(
                "  "
                + (
                    describe_report(name, plan["fp8_layers"])
                    if "fp8_layers" in plan
                    else f"{name}: no FP8 layer report (plan built before the report existed)"
                )
            )
        else:
            print(f"  {name}: no FP8-quantized layers")
    return 0


def _inspect_build(build: Path) -> int:
    """The DiT's FLOPs split into FP8 and 16-bit (from dit.onnx), then each TensorRT plan's FP8 layers if it has plans."""
    from ..engines.manifest import load_manifest
    from ..engines.plans import engines_section
    from ..errors import UsageError
    from ..export.flops import format_flops, format_flops_split, graph_flops_split

    manifest = load_manifest(build)
    graph = manifest.graphs.get("dit")
    has_dit = graph is not None and "latent_frames" in graph.get("meta", {}) and manifest.path("dit").is_file()
    has_plans = engines_section(manifest) is not None
    if not has_dit and not has_plans:
        raise UsageError(f"{build}: the build has neither a DiT graph nor TensorRT plans to inspect")
    if has_dit:
        meta = graph["meta"]
        print(f"{build}: precision {manifest.precision}, DiT at {meta['latent_height'] * 8}x{meta['latent_width'] * 8}")
        for frames, tokens in zip(meta["latent_frames"], meta["tokens_per_chunk"]):
            split = graph_flops_split(manifest.path("dit"), {"batch": 1, "frames": frames})
            print(f"  one sequence, {frames} latent frames ({tokens} tokens): {format_flops_split(split)}")
            print(
                f"    linear: FP8 {format_flops(split['linear_fp8'])}, 16-bit {format_flops(split['linear_high_precision'])}; "
                f"attention: FP8 {format_flops(split['attention_fp8'])}, 16-bit "
                f"{format_flops(split['attention_high_precision'])} (softmax x V is 16-bit: the graph leaves the "
                "softmax output unquantized)"
            )
    return _inspect_plans(build) if has_plans else 0


def _inspect(args) -> int:
    if args.build is not None:
        return _inspect_build(args.build)

    from ..dtypes import PRECISION_DTYPES
    from ..models.sources import load_model_set

    dtype = PRECISION_DTYPES[args.dtype]
    models = load_model_set(args.preset, args.checkpoints, args.config, dtype)
    for name in ("dit", "vae", "t5"):
        module = getattr(models, name)
        n = sum(p.numel() for p in module.parameters())
        print(f"{name:4s} {n:>15,d} parameters  {module.cfg}")
    print(f"tokenizer: {models.tokenizer}")
    return 0


def _onnx(args) -> int:
    from ..export.build import describe_build, export_build

    fp8 = _fp8_options(args)
    if fp8 is not None:
        from ..calibration.export import fp8_build

        manifest = fp8_build(args.out, _export_source(args), fp8, progress=not args.no_progress)
        print(describe_build(manifest, args.out))
        return 0
    manifest = export_build(args.out, _export_source(args), precision=args.precision, progress=not args.no_progress)
    print(describe_build(manifest, args.out))
    return 0


ENGINE_FLAGS = (
    "opt_level",
    "workspace",
    "weight_streaming",
    "hardware_compat",
    "version_compatible",
    "strip_weights",
    "verbose",
)


def _build(args) -> int:
    from ..errors import UsageError

    engine = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    if "workspace" in engine:
        from ..engines.builder import parse_size

        engine["workspace"] = parse_size(engine["workspace"])
    if args.resume is not None:
        from dataclasses import fields

        from ..export.source import ExportSource

        source_flags = [f.name for f in fields(ExportSource) if f.name != "opset"]  # --opset has a value always
        given = [f"--{k.replace('_', '-')}" for k in source_flags if getattr(args, k) not in (None, False)]
        if args.out is not None or given:
            raise UsageError(
                f"--resume reuses BUILD as exported: do not give {', '.join((['--out'] if args.out else []) + given)}"
            )
        from ..engines.build import resume_build

        result = resume_build(args.resume, overrides=engine)
    else:
        if args.out is None:
            raise UsageError("--out: required (or --resume BUILD to finish an earlier build)")
        from ..engines.builder import EngineOptions
        from ..toolchain import export_and_build

        result = export_and_build(
            args.out,
            _export_source(args),
            precision=args.precision,
            options=EngineOptions(**engine),
            fp8=_fp8_options(args),
            progress=not args.no_progress,
        )
    print(result.summary())
    return 0


def _check(args) -> int:
    from ..engines.check import Tolerance, check_build
    from ..errors import UsageError

    tolerance = None
    given = [args.error_stat, args.atol, args.rtol]
    if any(v is not None for v in given):
        if None in given:
            raise UsageError(
                "--error-stat, --atol and --rtol go together (or leave all three out for the stated tolerances)"
            )
        if not (args.atol >= 0 and args.rtol >= 0):
            raise UsageError(f"--atol and --rtol must be >= 0, got {args.atol} and {args.rtol}")
        tolerance = Tolerance(args.error_stat, args.atol, args.rtol, "given on the command line")
    results = check_build(
        args.build,
        graphs=args.graphs,
        runner=args.runner,
        reference=args.reference,
        seed=args.seed,
        tolerance=tolerance,
        verbose=args.verbose,
    )
    for r in results:
        print("\n".join(r.lines()))
    failed = [r.graph for r in results if not r.passed]
    print(
        f"{len(failed)} of {len(results)} graph(s) failed: {', '.join(failed)}"
        if failed
        else f"all {len(results)} graph(s) within tolerance"
    )
    return 1 if failed else 0


def _calibrate(args) -> int:
    from ..calibration.export import FP8Options, calibrate_build

    options = FP8Options(**_calibration_fields(args))
    cal = calibrate_build(
        args.out, _export_source(args), options, dtype=args.calib_dtype, progress=not args.no_progress
    )
    print(f"calibration written to {cal.path} ({len(cal.data['prompts'])} videos)")
    return 0


COMMANDS = {
    "init-tiny": _init_tiny,
    "train-toy": _train_toy,
    "inspect": _inspect,
    "onnx": _onnx,
    "build": _build,
    "check": _check,
    "calibrate": _calibrate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: COMMANDS[args.command](args))
