"""`tm-export onnx`: every graph of a model set into one build directory.

    BUILD/manifest.json
    BUILD/onnx/dit.onnx              (+ dit.onnx.data past 2 GB)
    BUILD/onnx/vae_encoder_first.onnx, vae_encoder.onnx
    BUILD/onnx/vae_decoder_first.onnx, vae_decoder.onnx
    BUILD/onnx/t5.onnx

The build is assembled in a staging directory beside BUILD and swapped in
only once every graph has exported, passed the checker and the op audit, and
been hashed: a failed export leaves any previous BUILD as it was. BUILD is
replaced only when it is a build of ours (export.target says what that is).
"""

from __future__ import annotations

import gc
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..atomic_write import output_error
from ..build_format import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_NAMES,
    MANIFEST_FILE,
    manifest_text,
    sha256_file,
)
from ..interrupts import raise_if_interrupted
from ..models.vae_tiling import TileSpec, resolve_tile, tile_shapes
from .onnx_utils import GraphRecord, export_graph
from .shapes import VAE_SPATIAL, ExportShape
from .source import ExportSource
from .target import (
    STAGING_MARKER,
    make_staging,
    prepare_target,
    swap_in,
    unmark_staging,
)

PRECISIONS = ("fp32", "fp16", "bf16")


def tool_versions() -> dict:
    import onnx

    out = {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__}
    for mod in ("onnxruntime", "onnxscript", "onnx_ir"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            out[mod] = None
    try:
        from importlib.metadata import version

        out["tempomaster"] = version("tempomaster-trt")
    except Exception:  # pragma: no cover
        out["tempomaster"] = None
    return out


def tiling_record(tile: TileSpec | None, shape: ExportShape) -> dict | None:
    """The manifest's `tiling` block: the tiling and every distinct tile
    shape of the build's frame, each with the suffix of its VAE graphs
    (the largest tile: none)."""
    if tile is None:
        return None
    tiles = []
    for i, (th, tw) in enumerate(tile_shapes(shape.latent_height, shape.latent_width, tile)):
        tiles.append(
            {
                "latent": [th, tw],
                "pixels": [th * VAE_SPATIAL, tw * VAE_SPATIAL],
                "suffix": "" if i == 0 else f"_{th}x{tw}",
            }
        )
    return {**tile.as_dict(), "tiles": tiles}


def base_graph_name(name: str) -> str:
    """`vae_decoder_30x30` -> `vae_decoder`: the graph a tile-shape variant stands for."""
    m = re.fullmatch(r"(.+)_\d+x\d+", name)
    return m.group(1) if m else name


def _graph_specs(
    models,
    precision: str,
    t5_precision: str,
    shape: ExportShape,
    wanted: set[str],
    copy: bool,
    tiling: dict | None = None,
    overrides: Mapping[str, Callable[[], list]] | None = None,
):
    """Yield (name, spec factory) lazily, so only one cast copy lives at a time."""
    from .dit import dit_spec
    from .t5 import t5_spec
    from .vae import vae_specs

    overrides = overrides or {}
    text_len = models.t5.cfg.text_len if models.t5 is not None else models.preset.t5.text_len
    if "dit" in wanted and "dit" in overrides:
        yield "dit", overrides["dit"]
    elif "dit" in wanted:
        yield "dit", lambda: [dit_spec(models.dit, precision, shape, text_len=text_len, copy=copy)]
    vae_wanted = [g for g in ("vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder") if g in wanted]
    if vae_wanted:
        if tiling is None:
            variants = [(shape, "")]
        else:
            # one set of step graphs per tile shape, static at that shape
            variants = [
                (replace(shape, height=t["pixels"][0], width=t["pixels"][1]), t["suffix"]) for t in tiling["tiles"]
            ]
        for vshape, suffix in variants:
            yield (
                "vae",
                (
                    lambda vshape=vshape, suffix=suffix: [
                        s
                        for s in vae_specs(models.vae, precision, vshape, copy=copy, suffix=suffix)
                        if base_graph_name(s.name) in wanted
                    ]
                ),
            )
    if "t5" in wanted:
        yield "t5", lambda: [t5_spec(models.t5, t5_precision, copy=copy)]


def export_onnx(
    models,
    precision: str,
    shape: ExportShape,
    out_dir: str | os.PathLike,
    *,
    opset: int = 23,
    t5_precision: str | None = None,
    graphs: Iterable[str] | None = None,
    preset_name: str | None = None,
    progress: bool = True,
    copy: bool = True,
    audit: bool = True,
    extra: dict | None = None,
    tile: bool | TileSpec = False,
    graph_overrides: Mapping[str, Callable[[], list]] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> dict:
    """Export the graphs of `models` (a ModelSet) at `precision` for `shape` into `out_dir`.

    t5_precision: the T5 graph's precision; default fp32 for an fp32 build
    and bf16 otherwise (umT5 overflows fp16). graphs: a subset of GRAPH_NAMES
    (default all). copy: cast copies of the models (False casts them in
    place, which saves memory when the caller no longer needs them).
    tile: True exports the VAE graphs at the release's tile shape (a
    TileSpec: that tiling), recorded in the manifest's `tiling`; a tile
    larger than the frame is cut to it.
    graph_overrides: graph group ("dit") -> factory of its GraphSpecs, used
    instead of the default one (the FP8 DiT). extra_files: relative path ->
    bytes written into the build and hashed with it (the calibration files,
    which would otherwise vanish when the new build replaces out_dir).
    Returns the manifest (also written to out_dir/manifest.json).
    """
    from .op_audit import audit_files, load_table
    from .t5 import T5_PRECISION_FOR

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    t5_precision = t5_precision or T5_PRECISION_FOR[precision]
    if t5_precision not in ("fp32", "bf16"):
        raise ValueError(f"the T5 graph must be fp32 or bf16 (umT5 overflows fp16), got {t5_precision!r}")
    wanted = set(graphs) if graphs is not None else set(GRAPH_NAMES)
    unknown = wanted - set(GRAPH_NAMES)
    if unknown:
        raise ValueError(f"unknown graphs {sorted(unknown)}; known: {', '.join(GRAPH_NAMES)}")
    shape.validate()
    tiling = tiling_record(resolve_tile(tile), shape)
    out_dir = Path(out_dir).absolute()
    prepare_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging(out_dir)
    t0 = time.perf_counter()
    records: list[GraphRecord] = []
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would become the build's mode
        onnx_dir = staging / "onnx"
        onnx_dir.mkdir()
        from tqdm.auto import tqdm

        vae_count = len([g for g in wanted if g.startswith("vae_")])
        total = len(wanted) + (vae_count * (len(tiling["tiles"]) - 1) if tiling else 0)
        # closed on the way out of an error too, so its last redraw comes before the CLI's message
        with tqdm(total=total, desc="tm-export onnx", unit="graph", disable=not progress, file=sys.stderr) as bar:
            for _group, make in _graph_specs(
                models, precision, t5_precision, shape, wanted, copy, tiling, graph_overrides
            ):
                for spec in make():
                    raise_if_interrupted()
                    bar.set_postfix_str(spec.name)
                    rec = export_graph(spec, onnx_dir, opset=opset, log=(bar.write if progress else None))
                    del spec
                    gc.collect()
                    records.append(rec)
                    bar.update(1)
        order = {n: i for i, n in enumerate(GRAPH_NAMES)}
        records.sort(key=lambda r: (order[base_graph_name(r.name)], r.name))
        audit_results = audit_files([onnx_dir / r.file for r in records], raise_on_error=audit) if audit else []
        tokenizer = getattr(models, "tokenizer", None)
        if tokenizer is not None:
            # The build carries its tokenizer, so `tm-run --engines` needs nothing else.
            _save_tokenizer(tokenizer, staging / "tokenizer")
        for rel, data in (extra_files or {}).items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and p.name != STAGING_MARKER):
            rel = path.relative_to(staging).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        src = load_table()["source"]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preset": preset_name or getattr(getattr(models, "preset", None), "name", None),
            "precision": precision,
            "opset": opset,
            "models": {
                k: _cfg_dict(getattr(models, k, None))
                for k in ("dit", "vae", "t5")
                if getattr(models, k, None) is not None
            },
            "shape": shape.as_dict(),
            "tiling": tiling,
            "graphs": {},
            "files": files,
            "op_audit": {
                "tensorrt_version": src["tensorrt_version"],
                "source": f"{src['repository']} {src['file']}",
                "ok": all(r.ok for r in audit_results),
                "graphs": {r.graph: {"ok": r.ok, "unsupported": r.unsupported} for r in audit_results},
            },
            "versions": tool_versions(),
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        if extra:
            manifest.update(extra)
        for r in records:
            d = r.as_dict()
            d["file"] = f"onnx/{r.file}"
            d["external_data"] = f"onnx/{r.external_data}" if r.external_data else None
            manifest["graphs"][r.name] = d
        (staging / MANIFEST_FILE).write_text(manifest_text(manifest), encoding="utf-8")
        raise_if_interrupted()  # a press some library swallowed: the old build stays
        unmark_staging(staging)
        swap_in(staging, out_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a quota: the previous build is untouched
            raise output_error(out_dir, err) from None
        raise
    return manifest


def _save_tokenizer(tokenizer, dest: Path) -> None:
    """Copy the tokenizer directory it was loaded from, or save the in-memory one."""
    from ..models.tokenizer import TINY_TOKENIZER_SOURCE, build_tiny_tokenizer

    source = getattr(tokenizer, "source", None)
    if source == TINY_TOKENIZER_SOURCE:
        build_tiny_tokenizer(dest)  # the same bytes as `tm-export init-tiny` writes
    elif source and Path(source).is_dir():
        shutil.copytree(source, dest)
    else:
        tokenizer.tokenizer.save_pretrained(str(dest))


def _cfg_dict(module) -> dict | None:
    cfg = getattr(module, "cfg", None)
    if cfg is None:
        return None
    try:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    except TypeError:
        return None


# ----------------------------------------------------------------------------
# `tm-export onnx`
# ----------------------------------------------------------------------------


def export_build(
    out: Path,
    source: ExportSource = ExportSource(),
    *,
    precision: str = "fp32",
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """`tm-export onnx`: load the models, export every graph into the build `out`. Returns the manifest.

    extra: more top-level manifest keys (`tm-export build` records its engine options there).
    """
    prepare_target(Path(out).absolute())  # a refusal costs nothing: no model is loaded yet
    t5_precision = source.t5_precision_for(precision)
    models, shape = source.load(precision, t5_precision)
    return export_onnx(
        models,
        precision,
        shape,
        out,
        **source.graph_options(precision),
        copy=False,
        progress=progress,
        extra={"random_weights": bool(source.random_weights), **(extra or {})},
        tile=source.tile,
    )


def describe_fp8(manifest: dict) -> str:
    """One line on what an fp8 build quantizes (the end of `tm-export onnx` and of `tm-export build`)."""
    fp8 = manifest["fp8"]
    att = fp8.get("attention", {})
    attention = " and ".join(k for k in ("self", "cross") if att.get(k))
    skip = f", blocks {','.join(map(str, fp8['skip_blocks']))} kept in {fp8['base']}" if fp8["skip_blocks"] else ""
    # which of --fp8-attention on|off this build took, and whether that is the default
    # (the default as the export recorded it: the export layer does not import calibration)
    state, flag = ("on" if att.get("self") else "off"), ""
    if "self_default" in att:
        default = "on" if att["self_default"] else "off"
        flag = ", the default" if state == default else f"; the default is {default}"
    flag = f"--fp8-attention {state}{flag}"
    return (
        f"FP8: {fp8['quantized_layers']} block Linears ({fp8['weight_scale']} weight scales)"
        + (f", q/k/v of every {attention}-attention" if attention else ", attention in " + fp8["base"])
        + f" ({flag}){skip}; {fp8['base']} elsewhere"
    )


def describe_build(manifest: dict, out: Path) -> str:
    """A few lines on what a build holds, for the end of `tm-export onnx`."""
    total = sum(f["bytes"] for f in manifest["files"].values())
    t5 = manifest["graphs"].get("t5", {}).get("precision")
    lines = [
        f"{out}: {len(manifest['graphs'])} graphs, {total / 2**20:.1f} MiB, precision {manifest['precision']}"
        + (f" (t5 {t5})" if t5 else "")
        + f", exported in {manifest['export_seconds']:.1f}s"
    ]
    for name, g in manifest["graphs"].items():
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"][:6])
        lines.append(
            f"  {name:18s} {g['precision']:4s} max batch {g['max_batch']:<5d} {ins}{' ...' if len(g['inputs']) > 6 else ''}"
        )
    if manifest.get("fp8"):
        lines.append(f"  {describe_fp8(manifest)}")
    audit = manifest["op_audit"]
    lines.append(f"  op audit (TensorRT {audit['tensorrt_version']} parser): {'ok' if audit['ok'] else 'FAILED'}")
    return "\n".join(lines)
