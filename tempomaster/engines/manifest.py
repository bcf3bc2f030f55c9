"""A build's manifest.json: read it, verify it, compare it with a request.

`tm-export` writes BUILD/manifest.json; `tm-run` (any backend) reads only
the manifest and the files it names, and refuses a build whose files or
shapes do not match what was asked. This module is what the runtime
imports for that: it needs json and hashlib (and `onnx`, lazily, to read a
graph's inputs), never the export machinery.

Format (format_version 1):

    {
      "format": "tempomaster-build", "format_version": 1,
      "created": ISO time,
      "preset": "tiny", "precision": "fp16", "opset": 23,
      "models": {"dit": {...DiTConfig}, "vae": {...}, "t5": {...}},
      "shape": {"height", "width", "num_frames", "intervals", "latent_height",
                "latent_width", "stages": [{"interval","chunks","chunk_frames",
                "latent_frames"}], "dit_latent_frames": [...], "max_chunks"},
      "tiling": null | {"size": [h, w], "stride": [h, w] (latent units),
                "tiles": [{"latent": [h, w], "pixels": [H, W], "suffix": ""}, ...]},
                (a tiled build's VAE graphs take one tile; a tile shape other than
                the first has its own graphs, named NAME + suffix)
      "graphs": {NAME: {"file": "onnx/NAME.onnx", "external_data": "onnx/NAME.onnx.data" | null,
                        "precision", "inputs": [{"name","dtype","shape"}], "outputs": [...],
                        "max_batch", "largest_activation", "ops", "weight_bytes", "meta"}},
      "files": {RELPATH: {"sha256", "bytes"}},
      "op_audit": {"tensorrt_version", "source", "ok", "graphs": {NAME: {"ok","unsupported"}}},
      "versions": {"tempomaster","torch","onnx","onnxruntime","onnxscript","python"},
      "manifest_sha256": sha256 of every other key as canonical JSON (build_format.manifest_sha256)
    }

Shapes list ints and symbol names ("batch", "frames", "24*frames").

What a manifest is trusted with: nothing outside its build folder. Every path
it names (files, graph files, plans, the timing cache, the calibration) must
resolve inside the folder, symbolic links followed (engines.build_paths),
before any file is looked at; the fields the runtime reads are checked for
kind; and a manifest whose checksum does not match its content was edited
and is refused. A manifest without a checksum (written before manifests
carried one) is read with the same checks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..build_format import (  # noqa: F401  (part of this module's API)
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_SHA256_KEY,
    ONNX_DTYPE_NAMES,  # noqa: F401
    manifest_sha256,
    sha256_file,
)
from ..json_files import read_json_object
from .build_paths import OutsideBuild, resolve_inside

# onnxruntime's type strings -> manifest dtype names
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


from ..errors import ManifestError  # noqa: E402


@dataclass
class Manifest:
    data: dict
    root: Path

    @property
    def preset(self) -> str:
        return self.data["preset"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def shape(self) -> dict:
        return self.data["shape"]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    def graph(self, name: str) -> dict:
        try:
            return self.graphs[name]
        except KeyError:
            raise ManifestError(
                f"{self.root}: the build has no graph {name!r} (it has {', '.join(sorted(self.graphs))})"
            ) from None

    def path(self, name: str) -> Path:
        return self.root / self.graph(name)["file"]

    def max_batch(self, name: str) -> int:
        return int(self.graph(name)["max_batch"])


def load_manifest(build_dir: str | os.PathLike) -> Manifest:
    root = Path(build_dir)
    path = root / MANIFEST_FILE
    try:
        resolve_inside(root, MANIFEST_FILE)  # a manifest.json linked from elsewhere is not read
    except OutsideBuild as err:
        raise ManifestError(f"{path}: {err}; refusing the build") from None
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST_FILE}; not a tm-export build directory")
    data = read_json_object(path, ManifestError, "manifest")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {data.get('format_version')!r}; this runtime reads {FORMAT_VERSION}"
        )
    _check_seal(data, path)
    _check_structure(data, path)
    _check_models(data, path)
    _check_paths(data, root, path)
    return Manifest(data, root)


def _check_seal(data: dict, path: Path) -> None:
    """The manifest is as tm-export wrote it (when it carries a checksum: older builds do not)."""
    if MANIFEST_SHA256_KEY not in data:
        return
    if data[MANIFEST_SHA256_KEY] != manifest_sha256(data):
        raise ManifestError(
            f"{path}: edited after tm-export wrote it (its {MANIFEST_SHA256_KEY} does not match its content); "
            "refusing the build: re-export it with tm-export instead of editing its manifest"
        )


def _check_structure(data: dict, path: Path) -> None:
    """Everything the runtime reads is there and of the right kind, and every graph file is hashed."""
    missing = [k for k in ("preset", "precision", "models", "shape", "graphs", "files") if k not in data]
    if missing:
        raise ManifestError(f"{path}: missing {', '.join(missing)}")
    for key in ("models", "shape", "graphs", "files"):
        if not isinstance(data[key], dict):
            raise ManifestError(f"{path}: {key} must be an object, got {type(data[key]).__name__}")
    shape_missing = [k for k in ("height", "width", "num_frames", "intervals") if k not in data["shape"]]
    if shape_missing:
        raise ManifestError(f"{path}: shape lacks {', '.join(shape_missing)}")
    _check_objects(data, path)
    for name, graph in data["graphs"].items():
        if not isinstance(graph, dict):
            raise ManifestError(f"{path}: graph {name!r} must be an object")
        for key in ("file", "inputs", "outputs", "max_batch"):
            if key not in graph:
                raise ManifestError(f"{path}: graph {name!r} lacks {key}")
        if not isinstance(graph["max_batch"], int) or graph["max_batch"] < 1:
            raise ManifestError(
                f"{path}: graph {name!r} has max_batch {graph['max_batch']!r}, expected an integer >= 1"
            )
        for key in ("inputs", "outputs"):
            _check_tensors(graph[key], f"graphs.{name}.{key}", path)
        # A file a graph names but the hash list omits would load unchecked.
        for key in ("file", "external_data"):
            rel = graph.get(key)
            if not (isinstance(rel, str) or (key == "external_data" and rel is None)):
                raise ManifestError(f"{path}: graphs.{name}.{key} must be a path, got {rel!r}")
            if rel and rel not in data["files"]:
                raise ManifestError(f"{path}: graphs.{name}.{key} names {rel}, which has no sha256 in files")


def _check_objects(data: dict, path: Path) -> None:
    """The optional sections that name paths are objects where they are present."""
    for field, value in (("engines", data.get("engines")), ("fp8", data.get("fp8"))):
        if value is not None and not isinstance(value, dict):
            raise ManifestError(f"{path}: {field} must be an object, got {type(value).__name__}")
    plans = (data.get("engines") or {}).get("plans")
    if plans is not None and not (isinstance(plans, dict) and all(isinstance(p, dict) for p in plans.values())):
        raise ManifestError(f"{path}: engines.plans must map graph names to objects")
    calibration = (data.get("fp8") or {}).get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise ManifestError(f"{path}: fp8.calibration must be an object, got {type(calibration).__name__}")


def _positive_int(value) -> bool:
    return type(value) is int and value > 0


def _check_tensors(tensors, field: str, path: Path) -> None:
    if not isinstance(tensors, list):
        raise ManifestError(f"{path}: {field} must be a list, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not (
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list)
            and all(d is None or isinstance(d, (int, str)) for d in t["shape"])
        ):
            raise ManifestError(f"{path}: {field}[{i}] must be an object with a name, a dtype and a shape list")


# The model fields the runtime reads (runtime.backends.base.model_info_from_manifest), per graph that needs them.
MODEL_FIELDS = {"dit": ("dim", "num_heads", "text_dim", "out_dim"), "t5": ("text_len",)}


def _check_models(data: dict, path: Path) -> None:
    """Shape and models fields of the right kind: a bad value is named here, not met as a traceback later."""
    shape = data["shape"]
    for key in ("height", "width", "num_frames"):
        if not _positive_int(shape[key]):
            raise ManifestError(f"{path}: shape.{key} must be a positive integer, got {shape[key]!r}")
    if not (
        isinstance(shape["intervals"], list)
        and shape["intervals"]
        and all(_positive_int(i) for i in shape["intervals"])
    ):
        raise ManifestError(f"{path}: shape.intervals must be a list of positive integers, got {shape['intervals']!r}")
    for model, fields in MODEL_FIELDS.items():
        if model not in data["graphs"]:
            continue
        cfg = data["models"].get(model)
        if not isinstance(cfg, dict):
            raise ManifestError(f"{path}: models.{model} must be the {model} model's settings (an object), got {cfg!r}")
        for key in fields:
            if not _positive_int(cfg.get(key)):
                got = "nothing" if key not in cfg else repr(cfg[key])
                raise ManifestError(f"{path}: models.{model}.{key} must be a positive integer, got {got}")
    if "dit" in data["graphs"]:
        patch = data["models"]["dit"].get("patch_size")
        if not (isinstance(patch, list) and len(patch) == 3 and all(_positive_int(p) for p in patch)):
            raise ManifestError(f"{path}: models.dit.patch_size must be a list of 3 positive integers, got {patch!r}")


def _named_paths(data: dict) -> list[tuple[str, object]]:
    """(manifest field, path) for every path the manifest names."""
    named = []
    for name, graph in data["graphs"].items():
        named.append((f"graphs.{name}.file", graph["file"]))
        if graph.get("external_data") is not None:
            named.append((f"graphs.{name}.external_data", graph["external_data"]))
    engines = data.get("engines") or {}
    for name, plan in (engines.get("plans") or {}).items():
        named.append((f"engines.plans.{name}.file", plan.get("file")))
    if engines.get("timing_cache") is not None:
        named.append(("engines.timing_cache", engines["timing_cache"]))
    calibration = (data.get("fp8") or {}).get("calibration") or {}
    if calibration.get("file") is not None:
        named.append(("fp8.calibration.file", calibration["file"]))
    return named + [(f"files[{rel!r}]", rel) for rel in data["files"]]


def _check_paths(data: dict, root: Path, path: Path) -> None:
    """Every path the manifest names resolves inside the build folder, and every listed file has its sha256."""
    for field, rel in _named_paths(data):
        try:
            resolve_inside(root, rel)
        except OutsideBuild as err:
            raise ManifestError(
                f"{path}: {field}: {err}; refusing the build (its files must lie inside {root})"
            ) from None
    for rel, info in data["files"].items():
        sha = info.get("sha256") if isinstance(info, dict) else None
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ManifestError(f"{path}: files[{rel!r}].sha256 must be 64 hexadecimal digits")
        if "bytes" in info and not (type(info["bytes"]) is int and info["bytes"] >= 0):
            raise ManifestError(f"{path}: files[{rel!r}].bytes must be a byte count, got {info['bytes']!r}")


def verify_files(manifest: Manifest, names: Iterable[str] | None = None) -> None:
    """Every file the manifest lists (or those of the graphs in `names`) exists with its sha256."""
    files = manifest.data["files"]
    if names is not None:
        wanted = set()
        for n in names:
            g = manifest.graph(n)
            wanted.add(g["file"])
            if g.get("external_data"):
                wanted.add(g["external_data"])
        files = {k: v for k, v in files.items() if k in wanted}
    problems = []
    for rel, info in sorted(files.items()):
        p = manifest.root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            problems.append(f"{rel}: {size} bytes, manifest says {info['bytes']} (modified)")
            continue
        digest = sha256_file(p)
        if digest != info["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}..., manifest says {info['sha256'][:16]}... (modified)")
    if problems:
        raise ManifestError(f"{manifest.root}: files do not match the manifest:\n  " + "\n  ".join(problems))


def required_dit_latent_frames(num_frames: int, intervals: Sequence[int]) -> list[int]:
    from ..planner import plan_stages  # pure planning code, no models

    return sorted({s.latent_frames for s in plan_stages(num_frames, intervals)})


def check_request(
    manifest: Manifest,
    *,
    preset: str | None = None,
    precision: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    intervals: Sequence[int] | None = None,
) -> None:
    """Raise ManifestError listing every way the build differs from the request (None = any)."""
    diffs = []
    if preset is not None and preset != manifest.preset:
        diffs.append(f"preset: build {manifest.preset!r}, asked {preset!r}")
    if precision is not None and precision != manifest.precision:
        diffs.append(f"precision: build {manifest.precision!r}, asked {precision!r}")
    shape = manifest.shape
    if height is not None and int(height) != shape["height"]:
        diffs.append(f"height: build {shape['height']}, asked {height}")
    if width is not None and int(width) != shape["width"]:
        diffs.append(f"width: build {shape['width']}, asked {width}")
    if num_frames is not None or intervals is not None:
        nf = num_frames if num_frames is not None else shape["num_frames"]
        iv = list(intervals) if intervals is not None else shape["intervals"]
        need = required_dit_latent_frames(nf, iv)
        dit = manifest.graphs.get("dit")
        if dit is not None:
            have = dit.get("meta", {}).get("latent_frames", shape.get("dit_latent_frames", []))
            if dit.get("meta", {}).get("dynamic_frames"):
                bad = [f for f in need if not min(have) <= f <= max(have)]
                have_txt = f"{min(have)}..{max(have)}"
            else:
                bad = [f for f in need if f not in have]
                have_txt = ", ".join(map(str, have))
            if bad:
                diffs.append(
                    f"DiT latent frames: {nf} frames with intervals {iv} need {need}, "
                    f"the build's DiT takes {have_txt} (exported for {shape['num_frames']} frames, intervals {shape['intervals']})"
                )
    if diffs:
        raise ManifestError(f"{manifest.root}: the build does not match the request:\n  " + "\n  ".join(diffs))


def _norm_dim(d):
    if d is None or d == "" or (isinstance(d, int) and d < 0):
        return None
    return d


def check_graph_io(
    manifest: Manifest,
    name: str,
    inputs: Sequence[tuple[str, str, Sequence]],
    outputs: Sequence[tuple[str, str, Sequence]],
) -> None:
    """Compare a graph's actual (name, dtype, shape) inputs and outputs with the manifest."""
    g = manifest.graph(name)
    problems = []
    for kind, want_list, got_list in (("input", g["inputs"], inputs), ("output", g["outputs"], outputs)):
        want = {t["name"]: t for t in want_list}
        got = {n: (dt, list(sh) if sh is not None else None) for n, dt, sh in got_list}
        for n in want:
            if n not in got:
                problems.append(f"{kind} {n!r}: in the manifest, not in the graph")
        for n in got:
            if n not in want:
                problems.append(f"{kind} {n!r}: in the graph, not in the manifest")
        for n, t in want.items():
            if n not in got:
                continue
            dt, shape = got[n]
            if dt != t["dtype"]:
                problems.append(f"{kind} {n!r}: dtype {dt}, manifest says {t['dtype']}")
            if shape is not None:
                ws = [_norm_dim(d) for d in t["shape"]]
                gs = [_norm_dim(d) for d in shape]
                if len(ws) != len(gs) or any(
                    a is not None and b is not None and (isinstance(a, int) or isinstance(b, int)) and a != b
                    for a, b in zip(ws, gs)
                ):
                    problems.append(f"{kind} {n!r}: shape {shape}, manifest says {t['shape']}")
        got_order = [n for n, _, _ in got_list]
        want_order = [t["name"] for t in want_list]
        if set(got_order) == set(want_order) and got_order != want_order:
            problems.append(f"{kind} order {got_order}, manifest says {want_order}")
    if problems:
        raise ManifestError(
            f"{manifest.path(name)}: graph {name!r} does not match the manifest:\n  " + "\n  ".join(problems)
        )


def onnx_graph_io(path: str | os.PathLike) -> tuple[list, list]:
    """(name, dtype, shape) of an ONNX file's inputs and outputs, weights not loaded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def info(v):
        tt = v.type.tensor_type
        dims = []
        for d in tt.shape.dim:
            dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
        return v.name, ONNX_DTYPE_NAMES.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims

    return [info(v) for v in proto.graph.input], [info(v) for v in proto.graph.output]


def ort_session_io(session) -> tuple[list, list]:
    """(name, dtype, shape) of an onnxruntime InferenceSession's inputs and outputs."""

    def info(a):
        return a.name, ORT_DTYPES.get(a.type, a.type), list(a.shape)

    return [info(a) for a in session.get_inputs()], [info(a) for a in session.get_outputs()]


def verify_build(
    build_dir: str | os.PathLike,
    request: Mapping | None = None,
    graphs: Iterable[str] | None = None,
    check_hashes: bool = True,
    check_io: bool = True,
) -> Manifest:
    """Everything at once: load, hashes, graph inputs/outputs, request. Returns the manifest."""
    m = load_manifest(build_dir)
    names = list(graphs) if graphs is not None else sorted(m.graphs)
    for n in names:
        m.graph(n)
    if request:
        check_request(m, **dict(request))
    if check_hashes:
        verify_files(m, names)
    if check_io:
        for n in names:
            ins, outs = onnx_graph_io(m.path(n))
            check_graph_io(m, n, ins, outs)
    return m
