"""BUILD/onnx/NAME.onnx -> BUILD/engines/NAME.plan with the TensorRT 11.4 Python API.

One plan per graph of the build (dit, the four VAE step graphs, t5), one
optimization profile each (`profiles.build_profiles`). TensorRT 11 networks
are strongly typed: the plan's precision is the ONNX graph's dtypes, so no
precision flag is ever set here (TensorRT 11 has none).

Why the plain API and not polygraphy's loaders: polygraphy's
`CreateConfig(fp16=/bf16=/fp8=)` still sets flags TensorRT 11 removed, and
what this builder needs beyond it (stripped plans refitted from the ONNX,
the parsed network's I/O for the manifest, the logger's errors in our
messages) is a handful of calls; with every call ours, the API-surface test
(tests/test_tensorrt_api_surface.py) checks each name against the 11.4
bindings. torch-tensorrt is not used: every graph passes the TensorRT ONNX
parser's op audit at export, so the ONNX route serves all of them.

Nothing half-written: each plan goes to a temporary name; only when every
requested plan has built are they renamed into place and the manifest
updated, so a failed build leaves the previous plans (and their manifest
entries) as they were. The timing cache (BUILD/engines/timing.cache) is
saved after every graph and reused by later builds on the same GPU.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic_write import fsync_file, output_error, write_bytes
from ..build_format import GRAPH_NAMES
from ..errors import ExportError, MissingDependencyError, OutputError, UsageError, print_to_stderr
from ..interrupts import raise_if_interrupted
from .layer_report import fp8_layer_report, quantized_nodes_of_file, report_warning
from .manifest import load_manifest, sha256_file, verify_files
from .plans import (
    ENGINE_DIR,
    ENGINES_KEY,
    HARDWARE_COMPAT,
    TIMING_CACHE,
    engines_section,
    plan_file,
    write_manifest,
)
from .profiles import GraphProfile, build_profiles
from .trt_env import cuda_device, import_tensorrt, make_logger, resume_hint, versions

# TensorRT DataType member name -> manifest dtype name
TRT_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
    "INT8": "int8",
    "UINT8": "uint8",
    "FP8": "float8e4m3fn",
}


@dataclass(frozen=True)
class EngineOptions:
    """How plans are built (the `tm-export build` engine flags)."""

    opt_level: int = 3  # builder optimization level 0..5 (TensorRT's default 3)
    workspace: int | None = None  # bytes for the WORKSPACE memory pool; None = TensorRT's default (all device memory)
    weight_streaming: bool = False  # weights may stay in host memory and stream in (GPUs that cannot hold the DiT)
    hardware_compat: str = "none"  # "same-cc": every GPU of this compute capability; "ampere+": every GPU of 8.0+
    version_compatible: bool = False  # the plan runs on later TensorRT 11.x
    strip_weights: bool = False  # no weights in the plan; refitted from the build's ONNX when loaded
    guidance: bool = True  # profiles for guided generation (cond + uncond in one DiT batch)
    verbose: bool = False  # TensorRT's INFO / VERBOSE messages too

    def validate(self, name: Callable[[str], str] = lambda field: "--" + field.replace("_", "-")) -> EngineOptions:
        """Self, or UsageError naming the bad field as `name(field)` says (the flag by default)."""
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise UsageError(
                f"{name('opt_level')} must be an integer 0..5 (TensorRT's builder optimization level), got {self.opt_level!r}"
            )
        if self.workspace is not None and (not isinstance(self.workspace, int) or self.workspace <= 0):
            raise UsageError(f"{name('workspace')} must be a positive size such as 8GiB, got {self.workspace!r}")
        if not isinstance(self.hardware_compat, str) or self.hardware_compat not in HARDWARE_COMPAT:
            raise UsageError(
                f"{name('hardware_compat')} must be one of {', '.join(HARDWARE_COMPAT)}, got {self.hardware_compat!r}"
            )
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> EngineOptions:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in fields})


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GiB', '8G', '512MiB', '1073741824' -> bytes (binary multiples: a GPU's memory is counted in GiB)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"--workspace: expected a size such as 8GiB, 512MiB or a byte count, got {text!r}")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise UsageError(f"--workspace must be positive, got {text!r}")
    return value


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _missing(build_dir, err: MissingDependencyError) -> MissingDependencyError:
    return MissingDependencyError(f"{err}; the ONNX build in {build_dir} is complete: {resume_hint(build_dir)}")


def _dtype_name(dt) -> str:
    name = getattr(dt, "name", None) or str(dt).rsplit(".", 1)[-1]
    return TRT_DTYPE_NAMES.get(name, name.lower())


def _network_io(network) -> tuple[list[dict], list[dict]]:
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    return (
        [{"name": t.name, "dtype": _dtype_name(t.dtype)} for t in ins],
        [{"name": t.name, "dtype": _dtype_name(t.dtype)} for t in outs],
    )


def _check_network_io(name: str, graph: dict, ins: list[dict], outs: list[dict]) -> None:
    """The parsed network must take and give what the manifest says the ONNX does."""
    want_in = [{"name": t["name"], "dtype": t["dtype"]} for t in graph["inputs"]]
    want_out = [{"name": t["name"], "dtype": t["dtype"]} for t in graph["outputs"]]
    if ins != want_in or outs != want_out:
        raise ExportError(
            f"{name}: the TensorRT network's I/O differ from the manifest: inputs {ins} vs {want_in}, outputs {outs} vs {want_out}"
        )


def _parse(trt, builder, logger, onnx_path: Path, name: str):
    network = builder.create_network()  # TensorRT 11: always strongly typed, no flags needed
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data (NAME.onnx.data) relative to the model file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"{e.node_name()} ({e.node_operator()}): {e.desc()}")
        raise ExportError(
            f"{name}: the TensorRT ONNX parser rejected {onnx_path.name}: "
            + "; ".join(errors[:5] or logger.errors[-5:])
        )
    return network, parser


def _config(trt, builder, options: EngineOptions, profile: GraphProfile, cache_blob: bytes, cache_path: Path, log):
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    # the engine inspector then names every layer's ONNX nodes, formats and kernel (the FP8 layer report)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace)
    _use_timing_cache(config, cache_blob, cache_path, log)
    p = builder.create_optimization_profile()
    for inp, (lo, opt, hi) in profile.shapes.items():
        p.set_shape(inp, lo, opt, hi)
    if config.add_optimization_profile(p) < 0:
        raise ExportError(f"{profile.graph}: TensorRT refused the optimization profile {profile.as_dict()['shapes']}")
    if options.strip_weights:
        # refit from the same ONNX weights on load: REFIT_IDENTICAL lets the builder optimise for them
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if options.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif options.hardware_compat == "same-cc":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    return config


def _use_timing_cache(config, cache_blob: bytes, cache_path: Path, log) -> None:
    """The saved timing cache, or a fresh one when TensorRT cannot use it (named, never a build error).

    ignore_mismatch=False: a cache from another GPU or TensorRT is refused, not half-used.
    """
    if cache_blob:
        try:
            cache = config.create_timing_cache(cache_blob)
        except (RuntimeError, TypeError, ValueError):  # the bindings raise on bytes they cannot read
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            return
        log(
            f"[W] timing cache {cache_path}: TensorRT cannot use it (another GPU or TensorRT version, or damaged); "
            "building with a fresh cache, which replaces it"
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        log("[W] TensorRT refused a fresh timing cache; building without one")


def _read_timing_cache(cache_path: Path, log) -> bytes:
    """The saved timing cache's bytes; an unreadable one is named and skipped (TensorRT starts a fresh one)."""
    if not cache_path.exists():
        return b""
    try:
        return cache_path.read_bytes()
    except OSError as err:
        log(f"[W] timing cache {cache_path}: unreadable ({type(err).__name__}: {err}); building with a fresh cache")
        return b""


def _save_timing_cache(config, cache_path: Path, log) -> bytes:
    """Serialise the cache after a build; a failure is named and the build goes on (the cache only saves time)."""
    try:
        cache = config.get_timing_cache()
        blob = bytes(cache.serialize()) if cache is not None else b""
        if blob:
            write_bytes(cache_path, blob)
        return blob
    except (OSError, OutputError) as err:
        log(f"[W] timing cache {cache_path}: not saved ({type(err).__name__}: {err}); the plans are unaffected")
        return b""


def _inspect_plan(trt, logger, plan, options: EngineOptions, onnx_path: Path, name: str, log) -> dict:
    """What the built engine says of itself: activation memory, streamable weights, the FP8 layer report."""
    runtime = trt.Runtime(logger)
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ExportError(
            f"{name}: TensorRT cannot deserialise the plan it just built: "
            + ("; ".join(logger.errors[-5:]) or "no reason logged")
        )
    facts = {"device_memory_bytes": int(engine.device_memory_size_v2)}
    if options.weight_streaming:
        facts["streamable_weights_bytes"] = int(engine.streamable_weights_size)
    quantized = quantized_nodes_of_file(onnx_path)
    if quantized:
        inspector = engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        try:
            info = json.loads(text)
        except ValueError as err:
            raise ExportError(
                f"{name}: the engine inspector's JSON is unreadable ({err}); cannot report the FP8 layers"
            ) from None
        facts["fp8_layers"] = report = fp8_layer_report(info, quantized)
        warning = report_warning(name, report)
        if warning:
            log(warning)
    return facts


def _graph_order(names) -> list[str]:
    names = list(names)
    return [g for g in GRAPH_NAMES if g in names] + sorted(g for g in names if g not in GRAPH_NAMES)


def build_engines(
    build_dir: str | os.PathLike,
    options: EngineOptions = EngineOptions(),
    *,
    graphs: Iterable[str] | None = None,
    log: Callable[[str], None] = print_to_stderr,
) -> dict:
    """Build one plan per graph of the build; returns the manifest's new `engines` section.

    Verifies the ONNX files against the manifest first (ManifestError on any
    change). MissingDependencyError (exit 3) when TensorRT or a CUDA GPU is
    missing; the ONNX build stays complete, `tm-export build --resume BUILD`
    on a GPU machine finishes it.
    """
    options = options.validate()
    root = Path(build_dir)
    manifest = load_manifest(root)
    # the six graphs in their usual order, then a tiled build's tile-shape VAE graphs
    names = list(graphs) if graphs is not None else _graph_order(manifest.graphs)
    for n in names:
        manifest.graph(n)
    verify_files(manifest, names)
    profiles = build_profiles(manifest.data, guidance=options.guidance, graphs=names)
    purpose = "building TensorRT engines"
    try:
        trt = import_tensorrt(purpose)
        device = cuda_device(purpose)
    except MissingDependencyError as err:
        raise _missing(root, err) from None
    ver = versions(trt)
    logger = make_logger(trt, log, options.verbose)
    engine_dir = root / ENGINE_DIR
    engine_dir.mkdir(exist_ok=True)
    cache_path = root / TIMING_CACHE
    cache_blob = _read_timing_cache(cache_path, log)
    log(
        f"[I] building {len(names)} TensorRT plan(s) in {engine_dir} with TensorRT {ver['tensorrt']} on {device.name} "
        f"(compute capability {device.cc}); timing cache {'reused' if cache_blob else 'new'}"
    )
    t_all = time.perf_counter()
    temps: dict[str, Path] = {}
    entries: dict[str, dict] = {}
    try:
        for k, name in enumerate(names, 1):
            raise_if_interrupted()
            graph = manifest.graph(name)
            onnx_path = manifest.path(name)
            prof = profiles[name]
            t0 = time.perf_counter()
            log(
                f"[I] [{k}/{len(names)}] {name}: parsing {onnx_path.relative_to(root)} ({_gb(int(graph.get('weight_bytes', 0)))} of weights)"
            )
            builder = trt.Builder(logger)
            network, parser = _parse(trt, builder, logger, onnx_path, name)
            ins, outs = _network_io(network)
            _check_network_io(name, graph, ins, outs)
            t_parse = time.perf_counter() - t0
            frames = f", frames {prof.frames[0]}/{prof.frames[1]}/{prof.frames[2]}" if prof.frames else ""
            log(
                f"[I] [{k}/{len(names)}] {name}: parsed in {t_parse:.1f}s; building (profile batch "
                f"{prof.batch[0]}/{prof.batch[1]}/{prof.batch[2]}{frames}, opt level {options.opt_level}), "
                f"elapsed {time.perf_counter() - t_all:.1f}s"
            )
            config = _config(trt, builder, options, prof, cache_blob, cache_path, log)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise ExportError(
                    f"{name}: TensorRT could not build a plan: " + ("; ".join(logger.errors[-5:]) or "no reason logged")
                )
            cache_blob = _save_timing_cache(config, cache_path, log) or cache_blob
            facts = _inspect_plan(trt, logger, plan, options, onnx_path, name, log)
            final = root / plan_file(name)
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            temps[name] = tmp
            try:  # every plan is staged first and all replace the previous ones together below
                with open(tmp, "wb") as f:
                    f.write(plan)
                fsync_file(tmp)
            except OSError as err:
                raise output_error(final, err) from None
            del plan, config, parser, network, builder
            seconds = time.perf_counter() - t0
            size = tmp.stat().st_size
            entries[name] = {
                "file": plan_file(name),
                "sha256": sha256_file(tmp),
                "bytes": size,
                "tensorrt_version": ver["tensorrt"],
                "onnx_parser_version": ver["onnx_parser"],
                "gpu": device.name,
                "compute_capability": device.cc,
                "hardware_compat": options.hardware_compat,
                "version_compatible": options.version_compatible,
                "stripped": options.strip_weights,
                "weight_streaming": options.weight_streaming,
                "precision": graph.get("precision"),
                "profile": prof.as_dict(),
                "inputs": ins,
                "outputs": outs,
                "build_seconds": round(seconds, 2),
                **facts,
            }
            log(
                f"[I] [{k}/{len(names)}] {name}: built in {seconds:.1f}s -> {plan_file(name)} ({_gb(size)}), "
                f"elapsed {time.perf_counter() - t_all:.1f}s"
            )
        raise_if_interrupted()
        # every plan built: only now do they replace the previous ones
        for name, tmp in temps.items():
            os.replace(tmp, root / plan_file(name))
        temps.clear()
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    fresh = load_manifest(root).data  # the manifest as it is now (nothing else changed it: same build)
    previous = engines_section(fresh) or {}
    plans = {n: e for n, e in previous.get("plans", {}).items() if n not in entries}
    plans.update(entries)
    section = {
        "tensorrt_version": ver["tensorrt"],
        "onnx_parser_version": ver["onnx_parser"],
        "gpu": device.name,
        "compute_capability": device.cc,
        "options": options.as_dict(),
        "timing_cache": TIMING_CACHE,
        "plans": {n: plans[n] for n in _graph_order(plans)},
    }
    fresh[ENGINES_KEY] = section
    write_manifest(root, fresh)
    log(f"[I] {len(entries)} plan(s) built in {time.perf_counter() - t_all:.1f}s; manifest updated")
    return section
