"""`tm-export check BUILD`: each graph of a build on two runners, the same random inputs, compared by polygraphy.

The two runners are
- `--runner tensorrt` (a GPU with TensorRT): the build's plan (polygraphy's
  TrtRunner) against the same graph's ONNX on onnxruntime;
- `--runner onnxruntime` with `--reference REF` (any machine): the build's
  graph against the same-named graph of another build, both on onnxruntime:
  an fp8 build's `--fp8-twin` DiT against the fp32 build, a bf16 build
  against the fp32 one.

Inputs are drawn once per graph (seeded) at the graph's TensorRT profile's
opt shapes (engines.profiles), fed to both runners through polygraphy's
`Comparator.run`, and judged by `Comparator.compare_accuracy` with a
`SimpleCompareFunc`: an output fails when its chosen error statistic (max or
mean over elements) exceeds both the absolute and the relative tolerance.
Per output we print the max and mean absolute error and the max and mean
relative error (|a - b| / (|b| + 1e-6)) against the tolerances stated for
the pair (`tolerance_for`; flags override them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingDependencyError, UsageError
from .manifest import Manifest, load_manifest, verify_files
from .profiles import eval_dim, graph_profile

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


@dataclass(frozen=True)
class Tolerance:
    stat: str  # "max" or "mean": the error statistic polygraphy checks
    atol: float
    rtol: float
    why: str

    def describe(self) -> str:
        return f"{self.stat} error <= atol {self.atol:g} or rtol {self.rtol:g} ({self.why})"


def tolerance_for(precision: str, reference_precision: str | None, runner: str) -> Tolerance:
    """The tolerance stated for a pair of runs of one graph."""
    if runner == "tensorrt":
        if precision == "fp32":
            return Tolerance("max", 1e-3, 1e-3, "TensorRT against onnxruntime, fp32: kernel order only")
        return Tolerance("mean", 1e-2, 2e-2, f"TensorRT against onnxruntime, {precision}: rounding of 16-bit kernels")
    if precision == reference_precision:
        return Tolerance("max", 1e-5, 1e-5, f"two {precision} graphs: the same arithmetic")
    if "fp8" in (precision, reference_precision):
        return Tolerance("mean", 5e-2, 1e-1, "FP8 against a wider graph: e4m3 keeps 3 mantissa bits")
    return Tolerance("mean", 1e-2, 2e-2, f"{precision} against {reference_precision}: 16-bit rounding")


def random_feeds(manifest: Manifest, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """One draw of every input of `name` at its profile's opt shapes (ids in-vocabulary, masks a prefix of ones)."""
    graph = manifest.graph(name)
    prof = graph_profile(name, graph, manifest.shape)
    symbols = {"batch": prof.batch[1]}
    if prof.frames is not None:
        symbols["frames"] = prof.frames[1]
    for k, v in (graph.get("meta") or {}).get("symbols", {}).items():
        symbols.setdefault(k, int(v))
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph["inputs"]:
        shape = tuple(eval_dim(d, symbols) for d in spec["shape"])
        dtype = spec["dtype"]
        if dtype not in _NP:
            raise UsageError(
                f"{name}: input {spec['name']} is {dtype}, which numpy cannot hold; tm-export check runs "
                "fp32 and fp16 graphs (check the fp32 build, an fp16 build, or the fp8 build's --fp8-twin)"
            )
        if spec["name"] == "mask":
            lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
            feeds["mask"] = (np.arange(shape[-1]) < lengths[..., None]).astype(_NP[dtype])
        elif spec["name"] == "ids":
            feeds["ids"] = rng.integers(1, 256, size=shape).astype(_NP[dtype])
        elif spec["name"] == "timestep":
            feeds["timestep"] = rng.uniform(0, 1000, size=shape).astype(_NP[dtype])
        elif np.issubdtype(_NP[dtype], np.floating):
            data = rng.standard_normal(shape)
            if spec["name"] == "frames":
                data = np.clip(data, -1, 1)  # the VAE's pixel range
            feeds[spec["name"]] = data.astype(_NP[dtype])
        else:
            feeds[spec["name"]] = rng.integers(0, 2, size=shape).astype(_NP[dtype])
    return feeds


def error_stats(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    diff = np.abs(a - b)
    rel = diff / (np.abs(b) + 1e-6)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
    }


@dataclass
class GraphCheck:
    graph: str
    tolerance: Tolerance
    outputs: dict[str, dict]  # name -> error_stats + "passed"

    @property
    def passed(self) -> bool:
        return all(o["passed"] for o in self.outputs.values())

    def lines(self) -> list[str]:
        out = [f"{self.graph}: {'ok' if self.passed else 'FAILED'} ({self.tolerance.describe()})"]
        for name, s in self.outputs.items():
            out.append(
                f"  {name:12s} max abs {s['max_abs']:.3e}  mean abs {s['mean_abs']:.3e}  "
                f"max rel {s['max_rel']:.3e}  mean rel {s['mean_rel']:.3e}  {'ok' if s['passed'] else 'FAILED'}"
            )
        return out


def _polygraphy(verbose: bool):
    try:
        from polygraphy.comparator import Comparator, SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError as err:
        raise MissingDependencyError(
            f"tm-export check needs polygraphy (pip install 'tempomaster-trt[check]'): {err}"
        ) from None
    # polygraphy prints every tensor it compares at INFO: our table says what matters unless asked
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    return Comparator, SimpleCompareFunc


def _onnxrt_runner(path: Path, name: str, providers: Sequence[str]):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=list(providers)), name=name)


def _trt_runner(manifest: Manifest, name: str):
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from .plans import check_plan, plan_entry
    from .trt_env import cuda_device, require_tensorrt_machine, versions

    trt = require_tensorrt_machine("tm-export check --runner tensorrt")
    gpu = cuda_device("tm-export check --runner tensorrt")
    entry = plan_entry(manifest, name)
    if entry.get("stripped"):
        raise UsageError(
            f"{name}: the plan is weight-stripped; tm-export check runs whole plans (rebuild without --strip-weights)"
        )
    path = check_plan(
        manifest,
        name,
        tensorrt_version=versions(trt)["tensorrt"],
        compute_capability=gpu.compute_capability,
        gpu_name=gpu.name,
    )
    return TrtRunner(EngineFromBytes(path.read_bytes()), name=f"tensorrt:{name}")


def check_build(
    build: str | Path,
    *,
    graphs: Sequence[str] | None = None,
    runner: str = "onnxruntime",
    reference: str | Path | None = None,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> list[GraphCheck]:
    """Compare every graph (or `graphs`) of `build` on two runners; returns one GraphCheck per graph."""
    Comparator, SimpleCompareFunc = _polygraphy(verbose)
    manifest = load_manifest(build)
    names = list(graphs) if graphs else list(manifest.graphs)
    for n in names:
        manifest.graph(n)  # an unknown name is refused before anything runs
    if runner not in ("onnxruntime", "tensorrt"):
        raise UsageError(f"--runner must be onnxruntime or tensorrt, got {runner!r}")
    ref = None
    if runner == "onnxruntime":
        if reference is None:
            raise UsageError(
                "--runner onnxruntime compares two builds: give --reference REF (e.g. the fp32 build, or the fp8 twin)"
            )
        ref = load_manifest(reference)
        missing = [n for n in names if n not in ref.graphs]
        if missing:
            raise UsageError(f"--reference {reference}: no graph {missing[0]!r} (it has {', '.join(ref.graphs)})")
        verify_files(ref, names)
    elif reference is not None:
        raise UsageError(
            "--reference: --runner tensorrt compares the build's plans with its own ONNX; leave --reference out"
        )
    verify_files(manifest, names)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if runner == "tensorrt" else ["CPUExecutionProvider"]
    results = []
    for name in names:
        tol = tolerance or tolerance_for(manifest.precision, ref.precision if ref else manifest.precision, runner)
        feeds = random_feeds(manifest, name, seed)
        if runner == "tensorrt":
            # the reference second: polygraphy's relative error divides by the second runner's output
            runners = [
                _trt_runner(manifest, name),
                _onnxrt_runner(manifest.path(name), f"onnxruntime:{name}", providers),
            ]
        else:
            runners = [
                _onnxrt_runner(manifest.path(name), f"build:{name}", providers),
                _onnxrt_runner(ref.path(name), f"reference:{name}", providers),
            ]
        log(
            f"[I] {name}: {runners[0].name} against {runners[1].name}, inputs "
            + ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        )
        run = Comparator.run(runners, data_loader=[feeds])
        accuracy = Comparator.compare_accuracy(
            run, compare_func=SimpleCompareFunc(check_error_stat=tol.stat, atol=tol.atol, rtol=tol.rtol)
        )
        verdicts = _verdicts(accuracy)
        outs = run[0][1][0], run[1][1][0]
        per_output = {}
        for out_name in outs[1].keys():
            stats = error_stats(outs[0][out_name], outs[1][out_name])
            stats["passed"] = bool(verdicts.get(out_name, False))
            per_output[out_name] = stats
        results.append(GraphCheck(name, tol, per_output))
    return results


def _verdicts(accuracy) -> dict[str, bool]:
    """Output name -> passed, from polygraphy's AccuracyResults (one comparison, one iteration)."""
    verdicts: dict[str, bool] = {}
    for result in accuracy:
        for _pair, iterations in result.items():
            for per_output in iterations:
                for out_name, ok in per_output.items():
                    verdicts[out_name] = verdicts.get(out_name, True) and bool(ok)
    return verdicts
