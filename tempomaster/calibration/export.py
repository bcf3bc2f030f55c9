"""The fp8 build: a calibrated Q/DQ DiT graph beside high-precision VAE and umT5 graphs.

`export_fp8_onnx(models, shape, out_dir, ...)` is what `tm-export onnx|build
--precision fp8` calls:

1. the calibration: run now into BUILD/calibration/ (default), or an
   existing one (`calibration=PATH`, or BUILD/calibration with
   `calibrate=False`), refused when it was made for another preset, shape
   or DiT weights;
2. the DiT's block Linears become `fp8.FP8Linear` layers, one at a time (the
   high-precision weight of a layer is dropped once its FP8 copy exists), and
   with `attention=True` (the default, `fp8.SELF_ATTENTION_DEFAULT`) the
   q, k, v of every self-attention get FP8 Q/DQ too (`fp8.FP8Attention`, q
   and k smoothed and rotated first; on the trained toy it keeps every
   held-out prompt that passes unquantized, benchmarks/results/
   fp8_report_toy.json), and with `cross_attention=True` those of every
   cross-attention (over 512 text tokens ~1% of the attention FLOPs at
   480x832); the rest of the DiT stays in the base dtype (bf16,
   or fp16; fp32 for the twin);
3. `export.build.export_onnx` exports that DiT (custom ops -> Q/DQ nodes) and
   the VAE / umT5 graphs at the base precision, and writes the manifest with
   "precision": "fp8", an "fp8" section, and the calibration files hashed
   with the rest of the build.

The fp32-based twin (`twin=True`) has the same Q/DQ nodes and scales with
fp32 everywhere else, so onnxruntime's CPU provider (which has no bf16 GEMM)
can run and check it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..export.source import ExportSource
from .collect import (
    AMAX_FILE,
    CALIBRATION_DIR,
    REPORT_FILE,
    WEIGHT_AMAX_FILE,
    Calibration,
    calibrate,
    dit_weights_sha256,
    load_calibration,
)
from .fp8 import (
    BASE_PRECISIONS,
    BLOCK_LINEARS,
    ONNX_TRANSLATIONS,
    SELF_ATTENTION_DEFAULT,
    WEIGHT_SCALES,
    attention_modules,
    block_of,
    parse_skip_blocks,
    quantizable_layers,
    quantize_dit,
)

FP8_BASES = ("bf16", "fp16")


def resolve_calibration(
    models,
    shape,
    out_dir: Path,
    *,
    calibration: str | os.PathLike | None,
    calibrate_now: bool,
    preset_name: str,
    calibrate_kwargs: dict,
) -> Calibration:
    if calibration is not None:
        cal = load_calibration(calibration)
    elif calibrate_now:
        cal = calibrate(models, shape, out_dir, preset_name=preset_name, **calibrate_kwargs)
    else:
        path = out_dir / CALIBRATION_DIR / AMAX_FILE
        if not path.is_file():
            raise UsageError(
                f"--no-calibrate: {path} not found; run tm-export calibrate --out {out_dir} first, or drop --no-calibrate"
            )
        cal = load_calibration(path)
    cal.check(preset=preset_name, shape=shape, dit_sha256=dit_weights_sha256(models.dit))
    return cal


def attention_kinds(attention: bool, cross_attention: bool) -> tuple[str, ...]:
    """--fp8-attention / --fp8-cross-attention -> the attentions quantize_dit makes FP8."""
    return (("self_attn",) if attention else ()) + (("cross_attn",) if cross_attention else ())


def _calibration_files(cal: Calibration) -> dict[str, bytes]:
    folder = cal.path.parent
    files = {}
    for name in (AMAX_FILE, WEIGHT_AMAX_FILE, REPORT_FILE):
        if (folder / name).is_file():
            files[f"{CALIBRATION_DIR}/{name}"] = (folder / name).read_bytes()
    return files


def export_fp8_onnx(
    models,
    shape,
    out_dir: str | os.PathLike,
    *,
    calibration: str | os.PathLike | None = None,
    calibrate_now: bool = True,
    calib_prompts=None,
    calib_steps: int | Sequence[int] | None = None,
    calib_set: str | None = None,
    seed: int = 0,
    report: bool = True,
    report_prompts: int = 4,
    calib_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base: str = "bf16",
    weight_scale: str = "tensor",
    skip_blocks: str | Iterable[int] | None = None,
    attention: bool = SELF_ATTENTION_DEFAULT,
    cross_attention: bool = False,
    twin: bool = False,
    t5_precision: str | None = None,
    graphs: Iterable[str] | None = None,
    preset_name: str | None = None,
    progress: bool = True,
    copy: bool = True,
    extra: dict | None = None,
    log: Callable[[str], None] | None = print,
    **export_options,
) -> dict:
    """Calibrate (unless given a calibration or `calibrate_now=False`) and export an fp8 build.

    base: "bf16" | "fp16", the high-precision dtype of the DiT (its Q/DQ
    scales and everything not quantized) and of the VAE graphs. twin: an
    fp32-based twin of the `base` graph instead (same scales, rounded to
    `base`, and FP8 weights; fp32 elsewhere). weight_scale: "tensor" |
    "channel". skip_blocks: blocks kept out of FP8 ("0,29", "0-2", ints,
    negative = from the end). attention / cross_attention: FP8 q, k, v for
    the self- / cross-attentions (needs a calibration with an "attention"
    section). copy=False quantizes `models.dit` in place,
    layer by layer (what a 14B export needs). `export_options` (opset,
    audit) go to `export_onnx` as they are. Returns the manifest.
    """
    from ..export.build import export_onnx
    from ..export.dit import dit_spec
    from ..export.t5 import T5_PRECISION_FOR

    if base not in FP8_BASES:
        raise UsageError(f"--fp8-base: {base!r} is not one of {', '.join(FP8_BASES)}")
    # The twin keeps the scales (rounded to `base`) and FP8 weights of the base
    # graph and computes everything else in fp32.
    scale_dtype = BASE_PRECISIONS[base]
    twin_of = base if twin else None
    if twin:
        base = "fp32"
    if weight_scale not in WEIGHT_SCALES:
        raise UsageError(f"--fp8-weight-scale: {weight_scale!r} is not one of {', '.join(WEIGHT_SCALES)}")
    if models.dit is None:
        raise UsageError("an fp8 build needs the DiT")
    num_layers = len(models.dit.blocks)
    skip = parse_skip_blocks(skip_blocks, num_layers)
    preset_name = preset_name or models.preset.name
    out_dir = Path(out_dir).absolute()
    try:
        shape.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None
    wanted = set(graphs) if graphs is not None else None
    from ..export.target import prepare_target

    prepare_target(out_dir)  # before minutes of calibration, not after
    cal = None
    if wanted is None or "dit" in wanted:
        cal = resolve_calibration(
            models,
            shape,
            out_dir,
            calibration=calibration,
            calibrate_now=calibrate_now,
            preset_name=preset_name,
            calibrate_kwargs=dict(
                prompts=calib_prompts,
                calib_steps=calib_steps,
                calib_set=calib_set,
                seed=seed,
                report=report,
                report_prompts=report_prompts,
                dtype=calib_dtype,
                device=device,
                progress=progress,
                log=log,
            ),
        )
    per_channel = cal.per_channel() if cal is not None and weight_scale == "channel" else None
    kinds = attention_kinds(attention, cross_attention)
    attention_amax = None
    if cal is not None and kinds:
        if not cal.has_attention:
            raise UsageError(
                f'{cal.path}: no "attention" section (made before FP8 attention); run tm-export '
                "calibrate again, or give --fp8-attention off"
            )
        attention_amax = cal.attention_table()
    dtype = BASE_PRECISIONS[base]
    t5_precision = t5_precision or T5_PRECISION_FOR[base]
    quantized = [n for n in quantizable_layers(num_layers) if block_of(n) not in set(skip)]
    fp8_meta = {
        "base": base,
        "twin": twin,
        "twin_of": twin_of,
        "scale_dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}[scale_dtype],
        "weight_scale": weight_scale,
        "skip_blocks": list(skip),
        "quantized_linears": list(BLOCK_LINEARS),
        "quantized_layers": len(quantized),
        "attention": {
            "self": "self_attn" in kinds,
            "self_default": SELF_ATTENTION_DEFAULT,  # for the build's summary line
            "cross": "cross_attn" in kinds,
            "quantized": [n for n in attention_modules(num_layers, kinds) if block_of(n) not in set(skip)],
            "inputs": "q, k, v: per-tensor amax/448 Q/DQ feeding the Attention node; softmax output in the base dtype",
            "qk_transform": "k less its token mean, then q and k times a Hadamard pair (H_q H_k^T = I) before their Q/DQ",
        },
        "activation_scale": "per-tensor amax/448",
        "weight_dtype": "float8e4m3fn",
    }
    text_len = models.t5.cfg.text_len if models.t5 is not None else models.preset.t5.text_len

    def dit_fp8_specs():
        q = quantize_dit(
            models.dit,
            cal.layer_table(),
            dtype,
            weight_scale,
            skip,
            per_channel,
            copy=copy,
            scale_dtype=scale_dtype,
            attention=attention_amax,
            attention_kinds=kinds,
        )
        if not copy:
            models.dit = q
        spec = dit_spec(q, base, shape, text_len=text_len, copy=False)
        spec.precision = "fp8"
        spec.translations = ONNX_TRANSLATIONS
        # Weights beside the graph whatever their size: an inline 1-2 GB protobuf
        # would be copied whole by the save and by every check after it (the
        # export's peak memory doubled on wan-1.3b).
        spec.external_data = True
        spec.meta["fp8"] = dict(fp8_meta)
        return [spec]

    manifest_extra = dict(extra or {})
    files = {}
    if cal is not None:
        files = _calibration_files(cal)
        fp8_meta["calibration"] = {
            "file": f"{CALIBRATION_DIR}/{AMAX_FILE}",
            "preset": cal.data["preset"],
            "shape": cal.data["shape"],
            "dit_sha256": cal.data["dit_sha256"],
            "seed": cal.data["seed"],
            "prompts": len(cal.data["prompts"]),
            "steps_per_stage": cal.data["settings"]["steps_per_stage"],
        }
    fp8_meta["high_precision_graphs"] = {
        **{g: base for g in ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder")},
        "t5": t5_precision,
    }
    manifest_extra.update({"precision": "fp8", "fp8": fp8_meta})
    return export_onnx(
        models,
        base,
        shape,
        out_dir,
        t5_precision=t5_precision,
        graphs=graphs,
        preset_name=preset_name,
        progress=progress,
        copy=copy,
        extra=manifest_extra,
        graph_overrides={"dit": dit_fp8_specs},
        extra_files=files,
        **export_options,
    )


# ----------------------------------------------------------------------------
# From model sources, as `tm-export calibrate` and `tm-export onnx|build --precision fp8` call them
# ----------------------------------------------------------------------------


# the FP8Options fields a calibration reads (`tm-export calibrate` has only these)
CALIBRATION_FIELDS = ("prompts", "calib_steps", "calib_set", "seed", "report_prompts")


@dataclass(frozen=True)
class FP8Options:
    """The fp8 flags of `tm-export onnx|build --precision fp8` (see `export_fp8_onnx` for each field).

    calibration: an existing amax.json (None: calibrate now into BUILD/calibration/,
    or with calibrate_now=False reuse the one there). prompts: a prompts file
    (None: the built-in set `calib_set`). calib_steps: steps per stage (one int
    for every stage). report_prompts: held-out prompts of the quality report (0: none).
    """

    calibration: Path | None = None
    calibrate_now: bool = True
    prompts: Path | None = None
    calib_steps: int | tuple[int, ...] | None = None
    calib_set: str | None = None
    seed: int = 0
    report_prompts: int = 4
    base: str = "bf16"
    weight_scale: str = "tensor"
    skip_blocks: str | tuple[int, ...] | None = None
    attention: bool = SELF_ATTENTION_DEFAULT
    cross_attention: bool = False
    twin: bool = False

    def __post_init__(self):
        steps = self.calib_steps
        if steps is not None and not isinstance(steps, int):
            steps = tuple(int(s) for s in steps)
            object.__setattr__(self, "calib_steps", steps[0] if len(steps) == 1 else steps)
        if self.base not in FP8_BASES:
            raise UsageError(f"--fp8-base: {self.base!r} is not one of {', '.join(FP8_BASES)}")

    def calibration_kwargs(self) -> dict:
        """The keywords `calibrate` takes from these options."""
        return {**{k: getattr(self, k) for k in CALIBRATION_FIELDS}, "report": self.report_prompts > 0}

    def export_kwargs(self) -> dict:
        """The keywords `export_fp8_onnx` takes from these options."""
        cal = self.calibration_kwargs()
        return dict(
            calibration=self.calibration,
            calibrate_now=self.calibrate_now,
            calib_prompts=cal.pop("prompts"),
            **cal,
            base=self.base,
            weight_scale=self.weight_scale,
            skip_blocks=self.skip_blocks,
            attention=self.attention,
            cross_attention=self.cross_attention,
            twin=self.twin,
        )


def _calibration_source(source: ExportSource) -> ExportSource:
    if source.random_weights:
        raise UsageError(
            "--random-weights: calibration needs a model that generates (and a tokenizer); "
            "give --checkpoints, or use the built-in tiny preset without --random-weights"
        )
    return source


def calibrate_build(
    out: str | os.PathLike,
    source: ExportSource = ExportSource(),
    options: FP8Options = FP8Options(),
    *,
    dtype: str = "fp32",
    progress: bool = True,
) -> Calibration:
    """`tm-export calibrate`: amax over whole generations into BUILD/calibration/ (and the quality report).

    Of `options` only the calibration fields count (prompts, calib_steps, calib_set, seed, report_prompts).
    dtype: the precision the models compute in while amax is collected.
    """
    from ..export.target import prepare_target

    prepare_target(Path(out).absolute())  # before any model loads
    models, shape = _calibration_source(source).load(dtype, "fp32" if dtype == "fp32" else "bf16")
    return calibrate(models, shape, out, progress=progress, **options.calibration_kwargs())


def fp8_build(
    out: str | os.PathLike,
    source: ExportSource = ExportSource(),
    options: FP8Options = FP8Options(),
    *,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """`tm-export onnx|build --precision fp8`: load, calibrate (or reuse a calibration), export. Returns the manifest."""
    from ..export.target import prepare_target

    if source.tile:
        raise UsageError(
            "--tile with --precision fp8: the fp8 export has no tiled VAE graphs yet; use a bf16 build for --tile"
        )
    prepare_target(Path(out).absolute())  # before any model loads
    precision = "fp32" if options.twin else options.base
    t5_precision = source.t5_precision_for(precision)
    # a calibration of random weights cannot exist: calibrate refuses them
    models, shape = _calibration_source(source).load(precision, t5_precision)
    return export_fp8_onnx(
        models,
        shape,
        out,
        **options.export_kwargs(),
        **source.graph_options(precision),
        progress=progress,
        copy=False,
        extra={"random_weights": False, **(extra or {})},
        log=(print if progress else None),
    )
