"""The TensorRT backend: a build's plans behind the same three calls, on torch CUDA tensors.

- Every plan is checked before TensorRT reads it: the TensorRT version and
  the compute capability recorded when it was built against this machine's
  (a mismatch is refused naming both), then its sha256. TensorRT 11.4 has no
  way to ask whether a plan suits a GPU short of deserialising it.
- One engine instance per device: the backend opens every plan on the CUDA
  device it is given (the rank's under `--devices` / torchrun), after checking
  that the plans, their activations and any streaming budget fit that
  device's free memory (engines.plan_memory).
- Weight-stripped plans are refitted from the build's ONNX (hash-checked)
  when loaded; weight-streaming plans get the budget asked for, or the one
  computed from the free memory; it is read back from TensorRT. CUDA graphs
  are refused on a streaming build (streaming makes execution synchronous).
- I/O is bound with `set_tensor_address` to torch tensors (no host copies
  inside a step; every address 256-byte aligned, a misaligned slice copied,
  every result checked), shapes are set per call with `set_input_shape`, and
  `execute_async_v3` runs on the backend's own CUDA stream, which waits for
  torch's current stream before each launch (inputs are ready) and is waited
  for by it after (outputs are read after); tensors are allocated on torch's
  stream only, so the caching allocator never reuses one still in use.
- A batch above a graph's limit (the smaller of the manifest's safe batch
  and the plan's profile maximum) is split into several calls.
- The VAE's causal caches ping-pong between two preallocated buffer sets per
  batch size, as in the onnxruntime backend.
- Optional CUDA graphs (`cuda_graphs=True`): one capture per (graph, input
  shapes) for the DiT and the VAE step graphs, each on its own execution
  context; all contexts of an engine share one device-memory buffer
  (USER_MANAGED allocation: the calls never overlap). A captured graph
  replays fixed addresses, so its inputs are copied into static buffers on
  the device (and the VAE caches ping-pong between two captures).

THIS MODULE HAS NEVER RUN ON A GPU: it is written against the TensorRT 11.4
Python API (every `trt` name it uses is checked against the 11.4 bindings by
tests/test_tensorrt_api_surface.py) and exercised only by tests/test_gpu_tensorrt.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ...build_format import GRAPH_NAMES
from ...dtypes import TENSOR_DTYPES
from ...engines.manifest import Manifest, ManifestError, load_manifest, verify_files
from ...engines.plan_memory import HEADROOM, check_budget_kept, check_plans_fit, plan_needs, streaming_budget
from ...engines.plans import check_plan, check_plan_compat, check_run_options, engines_section, plan_entry
from ...engines.trt_env import cuda_device, import_tensorrt, make_logger, versions
from ...errors import print_to_stderr
from ...models.vae_tiling import TileSpec
from .base import batch_slices, model_info_from_manifest
from .binding import aligned_empty, bindable, is_aligned
from .build_backend import BuildBackend, build_tiling

GRAPHS = GRAPH_NAMES


class PlanRunner:
    """One plan: checked, deserialised (lazily, on first use), one execution context per shape captured."""

    def __init__(self, backend: TensorRTBackend, name: str):
        self.backend = backend
        self.name = name
        manifest = backend.manifest
        self.spec = manifest.graph(name)
        self.entry = plan_entry(manifest, name)
        self.path = manifest.root / self.entry["file"]
        profile_max = int(self.entry["profile"]["batch"][2])
        self.max_batch = min(int(self.spec["max_batch"]), profile_max)
        self.inputs = [i["name"] for i in self.spec["inputs"]]
        self.outputs = [o["name"] for o in self.spec["outputs"]]
        self.dtypes = {t["name"]: TENSOR_DTYPES[t["dtype"]] for t in self.spec["inputs"] + self.spec["outputs"]}
        self._engine = None
        self._context = None
        self._scratch = None  # the device memory every context of this engine uses
        self._graphs: dict[tuple, tuple] = {}  # key -> (CUDAGraph, context)
        self._dynamic: set[str] | None = None
        self.engine_inputs: set[str] = set(self.inputs)  # narrowed to the plan's own when it loads

    def dtype(self, name: str) -> torch.dtype:
        return self.dtypes[name]

    # -- loading -------------------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.backend._load(self)
        return self._engine

    @property
    def dynamic_inputs(self) -> set[str]:
        """Inputs with a -1 dimension: the ones whose shape is set per call."""
        if self._dynamic is None:
            engine = self.engine
            self._dynamic = {n for n in self.engine_inputs if -1 in tuple(engine.get_tensor_shape(n))}
        return self._dynamic

    def _new_context(self):
        trt = self.backend.trt
        engine = self.engine
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"{self.path}: TensorRT could not create an execution context: {self.backend._errors()}")
        if self._scratch is None:
            size = int(engine.device_memory_size_v2)
            self._scratch = aligned_empty((max(size, 1),), torch.uint8, self.backend.device)
        ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        return ctx

    @property
    def context(self):
        if self._context is None:
            self._context = self._new_context()
        return self._context

    # -- running ---------------------------------------------------------------------

    def _address(self, ctx, name: str, t: torch.Tensor) -> None:
        """Bind one tensor; TensorRT refuses a misaligned or unknown address by returning False."""
        if not (t.is_contiguous() and is_aligned(t)):
            raise RuntimeError(
                f"{self.name}: {name} is not a contiguous 256-byte aligned buffer (address {t.data_ptr():#x})"
            )
        if not ctx.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"{self.path}: TensorRT refused the address of {name}: {self.backend._errors()}")

    def _bind(self, ctx, feeds: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """Set every input's shape and address (inputs already bindable); return the outputs' shapes."""
        dynamic = self.dynamic_inputs
        for name, t in feeds.items():
            if name not in self.engine_inputs:
                continue
            if name in dynamic and not ctx.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise ManifestError(
                    f"{self.path}: input {name} shape {tuple(t.shape)} is outside the plan's profile "
                    f"{tuple(lo)}..{tuple(hi)}; rebuild the plans for this shape (tm-export build)"
                )
            self._address(ctx, name, t)
        return {name: tuple(ctx.get_tensor_shape(name)) for name in self.outputs}

    def output_shapes(self, feeds: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """The shape of every output for the inputs `feeds` (name -> CUDA tensor), from the plan's shape inference."""
        return self._bind(self.context, {n: bindable(t) for n, t in feeds.items()})

    def _launch(self, ctx) -> None:
        """execute_async_v3 on the backend's stream, ordered after and before torch's current stream."""
        stream, current = self.backend.stream, torch.cuda.current_stream(self.backend.device)
        stream.wait_stream(current)  # inputs written by torch are ready
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path}: execute_async_v3 failed: {self.backend._errors()}")
        current.wait_stream(stream)  # torch reads the outputs after

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """One call with every input and output bound to the given (CUDA) tensors; misaligned ones go through copies.

        Each output buffer must have the shape `output_shapes(feeds)` gives for its name.
        """
        ctx = self.context
        shapes = self._bind(ctx, {n: bindable(t) for n, t in feeds.items()})
        bound = {}
        for name, t in outputs.items():
            if tuple(t.shape) != shapes[name]:
                raise RuntimeError(f"{self.name}: output {name} buffer {tuple(t.shape)}, the plan gives {shapes[name]}")
            bound[name] = t if (t.is_contiguous() and is_aligned(t)) else aligned_empty(t.shape, t.dtype, t.device)
            self._address(ctx, name, bound[name])
        self._launch(ctx)
        for name, t in outputs.items():
            if bound[name] is not t:
                t.copy_(bound[name])

    def run_graphed(self, key: tuple, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Replay the CUDA graph captured for `key`, capturing it on first use.

        The caller passes the same (static) tensors for the same key every time:
        a captured graph holds the addresses and shapes it was captured with.
        """
        hit = self._graphs.get(key)
        if hit is None:
            ctx = self._new_context()
            shapes = self._bind(ctx, feeds)
            for name, t in outputs.items():
                if tuple(t.shape) != shapes[name]:
                    raise RuntimeError(
                        f"{self.name}: output {name} buffer {tuple(t.shape)}, the plan gives {shapes[name]}"
                    )
                self._address(ctx, name, t)
            # one launch outside the capture: TensorRT finishes its shape-dependent setup there
            self._launch(ctx)
            self.backend.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.backend.stream):
                if not ctx.execute_async_v3(self.backend.stream.cuda_stream):
                    raise RuntimeError(
                        f"{self.path}: execute_async_v3 failed during CUDA graph capture: {self.backend._errors()}"
                    )
            self._graphs[key] = hit = (graph, ctx)
        stream, current = self.backend.stream, torch.cuda.current_stream(self.backend.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            hit[0].replay()
        current.wait_stream(stream)


class TensorRTBackend(BuildBackend):
    name = "tensorrt"
    files = "plans"
    export_command = "tm-export build"

    def __init__(
        self,
        manifest: Manifest,
        *,
        cuda_graphs: bool = False,
        weight_streaming_budget: int | None = None,
        verbose: bool = False,
        log: Callable[[str], None] = print_to_stderr,
        device_index: int | None = None,
        tile: bool | TileSpec = False,
    ):
        self.manifest = manifest
        # a tiled build: its VAE plans are at the tile's shapes, run tile by tile and blended as onnxruntime does
        self.tile, self._tile_suffix = build_tiling(manifest, tile)
        self.spatial_ratio = int(manifest.shape["height"]) // int(manifest.shape["latent_height"]) if self.tile else 8
        names = list(GRAPHS) + sorted(
            f"vae_{d}{s}"
            for s in set(self._tile_suffix.values())
            if s
            for d in ("encoder_first", "encoder", "decoder_first", "decoder")
        )
        self.log = log
        self.cuda_graphs = bool(cuda_graphs)
        self.weight_streaming_budget = weight_streaming_budget
        check_run_options(manifest, cuda_graphs=self.cuda_graphs)  # before anything is read or loaded
        # the GPU first, then TensorRT: the same one-line refusal as the factory's
        self.gpu = cuda_device("the tensorrt backend", device_index)
        self.trt = import_tensorrt("the tensorrt backend")
        self.device = torch.device("cuda", self.gpu.index)
        self.versions = versions(self.trt)
        self._logger = make_logger(self.trt, log, verbose)
        self._runtime = None
        # compatibility of every plan at startup, before any is read: cheap, and a foreign build fails at once
        for name in names:
            entry = plan_entry(manifest, name)
            for warning in check_plan_compat(
                entry,
                tensorrt_version=self.versions["tensorrt"],
                compute_capability=self.gpu.compute_capability,
                gpu_name=self.gpu.name,
                where=str(manifest.root / entry["file"]),
            ):
                log(f"[W] {warning}")
        # this device must hold every plan of its engine instance, before any loads
        free, _ = torch.cuda.mem_get_info(self.device)
        check_plans_fit(
            plan_needs(manifest.data, names, weight_streaming_budget),
            int(free),
            device=f"cuda:{self.gpu.index} ({self.gpu.name})",
        )
        # TensorRT's work runs on this stream, ordered against torch's current stream at each call
        self.stream = torch.cuda.Stream(self.device)
        self.graphs = {name: PlanRunner(self, name) for name in names}
        self.info = model_info_from_manifest(manifest.data)
        self._cache_sets: dict[tuple, list[list[torch.Tensor]]] = {}
        self._static: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_build(cls, build_dir: str | Path, verify: bool = True, **kwargs) -> TensorRTBackend:
        """Open a build with plans; the tokenizer's files are hash-checked here, each plan when it loads."""
        manifest = load_manifest(build_dir)
        cls.check_build(manifest, build_dir, kwargs.get("tile", False))  # a tiled build is run tiled, and only it
        if engines_section(manifest) is None:
            raise ManifestError(
                f"{build_dir}: the build has no TensorRT plans; build them with `tm-export build --resume {build_dir}`"
            )
        if verify:
            files = {k: v for k, v in manifest.data["files"].items() if k.startswith("tokenizer/")}
            verify_files(Manifest({**manifest.data, "files": files}, manifest.root))
        return cls(manifest, **kwargs)

    def _errors(self) -> str:
        return "; ".join(self._logger.errors[-5:]) or "no reason logged"

    @property
    def runtime(self):
        if self._runtime is None:
            self._runtime = self.trt.Runtime(self._logger)
        return self._runtime

    def _load(self, runner: PlanRunner):
        """Check, read, deserialise (and refit / budget) one plan."""
        trt = self.trt
        entry = runner.entry
        path = check_plan(
            self.manifest,
            runner.name,
            tensorrt_version=self.versions["tensorrt"],
            compute_capability=self.gpu.compute_capability,
            gpu_name=self.gpu.name,
        )
        if entry.get("version_compatible"):
            # a version-compatible plan carries its lean runtime; TensorRT runs it only when allowed
            self.runtime.engine_host_code_allowed = True
        with torch.cuda.device(self.device):  # every plan is deserialised on this backend's device
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ManifestError(f"{path}: TensorRT could not deserialise the plan: {self._errors()}")
        if entry.get("stripped"):
            verify_files(self.manifest, [runner.name])  # the weights come from this ONNX
            onnx_path = self.manifest.path(runner.name)
            refitter = trt.Refitter(engine, self._logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, self._logger)
            if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
                raise ManifestError(
                    f"{path}: refitting the weight-stripped plan from {onnx_path} failed: {self._errors()}"
                )
        if entry.get("weight_streaming"):
            self._set_streaming_budget(runner.name, engine)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if n not in ins]
        # TensorRT may drop an input no layer reads (a cache the `_first` VAE steps ignore): a subset is fine
        if not set(ins) <= set(runner.inputs) or sorted(outs) != sorted(runner.outputs):
            raise ManifestError(
                f"{path}: plan I/O {ins} -> {outs} differ from the manifest's {runner.inputs} -> {runner.outputs}"
            )
        runner.engine_inputs = set(ins)
        return engine

    def _set_streaming_budget(self, name: str, engine) -> None:
        """Compute, set and read back the budget, before any execution context of the engine exists."""
        streamable = int(engine.streamable_weights_size)
        free, _ = torch.cuda.mem_get_info(self.device)
        later = [g for g, r in self.graphs.items() if r._engine is None and g != name]
        reserved = (
            int(engine.device_memory_size_v2)
            + 2 * int(engine.weight_streaming_scratch_memory_size)
            + sum(
                n.weights + n.activations for n in plan_needs(self.manifest.data, later, self.weight_streaming_budget)
            )
            + HEADROOM
        )
        budget = streaming_budget(
            name, streamable=streamable, free_bytes=int(free), reserved=reserved, asked=self.weight_streaming_budget
        )
        engine.weight_streaming_budget_v2 = budget
        check_budget_kept(name, budget, int(engine.weight_streaming_budget_v2))
        automatic = int(engine.get_weight_streaming_automatic_budget())
        self.log(
            f"[I] {name}: weight streaming, {budget / 2**30:.2f} GiB of {streamable / 2**30:.2f} GiB streamable "
            f"weights on the GPU (TensorRT's automatic budget: {automatic / 2**30:.2f} GiB)"
        )

    # -- helpers --------------------------------------------------------------------

    def _prepare(self, g: PlanRunner, name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, g.dtypes[name]).contiguous()

    def _static_set(
        self, key: tuple, shapes: dict[str, tuple], dtypes: dict[str, torch.dtype]
    ) -> dict[str, torch.Tensor]:
        s = self._static.get(key)
        if s is None:
            s = {n: aligned_empty(sh, dtypes[n], self.device) for n, sh in shapes.items()}
            self._static[key] = s
        return s

    def _call(self, g: PlanRunner, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor], graphed: bool) -> None:
        """One call into `out` (slices of the caller's result tensors)."""
        if not (graphed and self.cuda_graphs):
            g.run(feeds, out)
            return
        key = (g.name, *[(n, tuple(t.shape)) for n, t in feeds.items()])
        shapes = {n: tuple(t.shape) for n, t in feeds.items()}
        shapes.update({n: tuple(t.shape) for n, t in out.items()})
        static = self._static_set(key, shapes, g.dtypes)
        for n, t in feeds.items():
            static[n].copy_(t)
        g.run_graphed(key, {n: static[n] for n in feeds}, {n: static[n] for n in out})
        for n, t in out.items():
            t.copy_(static[n])

    # -- the three calls ---------------------------------------------------------------

    @torch.inference_mode()
    def encode_text(self, ids, mask):
        g = self.graphs["t5"]
        ids, mask = self._prepare(g, "ids", ids), self._prepare(g, "mask", mask)
        out = None
        for s in batch_slices(ids.shape[0], g.max_batch):
            feeds = {"ids": ids[s], "mask": mask[s]}
            if out is None:
                shape = g.output_shapes(feeds)["embeddings"]
                out = torch.empty((ids.shape[0], *shape[1:]), dtype=g.dtypes["embeddings"], device=self.device)
            self._call(g, feeds, {"embeddings": out[s]}, graphed=False)  # once per video: nothing to gain
        return out

    @torch.inference_mode()
    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        g = self.graphs["dit"]
        feeds = {
            "x": self._prepare(g, "x", x),
            "y": self._prepare(g, "y", y),
            "timestep": self._prepare(g, "timestep", timestep.reshape(-1)[:1]),
            "context": self._prepare(g, "context", context),
            "rope_cos": self._prepare(g, "rope_cos", rope_cos),
            "rope_sin": self._prepare(g, "rope_sin", rope_sin),
        }
        out = torch.empty(feeds["x"].shape, dtype=g.dtypes["velocity"], device=self.device)
        for s in batch_slices(x.shape[0], g.max_batch):
            # slices along dim 0 of contiguous tensors stay contiguous: bound in place
            piece = {k: (v if k == "timestep" else v[s]) for k, v in feeds.items()}
            self._call(g, piece, {"velocity": out[s]}, graphed=True)
        return out

    def _cache_pair(self, first: PlanRunner, batch: int) -> list[list[torch.Tensor]]:
        """Two preallocated sets of every cache tensor for this direction and batch, zeroed (= nothing before)."""
        caches = first.spec["meta"]["caches"]
        key = (first.name, batch)
        pair = self._cache_sets.get(key)
        if pair is None:

            def alloc():
                return [
                    torch.empty(
                        [batch if d == "batch" else int(d) for d in c["shape"]],
                        dtype=first.dtypes[c["input"]],
                        device=self.device,
                    )
                    for c in caches
                ]

            pair = self._cache_sets[key] = [alloc(), alloc()]
        for t in pair[0]:
            t.zero_()
        return pair

    def _stream(self, first: PlanRunner, rest: PlanRunner, data_name: str, out_name: str, pieces: list[torch.Tensor]):
        """Run the causal step graphs over `pieces` (time slices), the caches ping-ponging between two buffer sets."""
        caches = first.spec["meta"]["caches"]
        batch = pieces[0].shape[0]
        pair = self._cache_pair(first, batch)
        results = []
        for k, piece in enumerate(pieces):
            g = first if k == 0 else rest
            src, dst = pair[k % 2], pair[(k + 1) % 2]
            data = self._prepare(g, data_name, piece)
            feeds = {data_name: data, **{c["input"]: t for c, t in zip(caches, src)}}
            cache_out = {c["output"]: t for c, t in zip(caches, dst)}
            if self.cuda_graphs:
                # the caches are already static (the pair lives as long as the backend): only the data is copied
                key = (g.name, batch, k % 2)
                shapes = g.output_shapes(feeds)
                static = self._static_set(key, {data_name: tuple(data.shape), out_name: shapes[out_name]}, g.dtypes)
                static[data_name].copy_(data)
                g.run_graphed(key, {**feeds, data_name: static[data_name]}, {out_name: static[out_name], **cache_out})
                results.append(static[out_name].clone())
            else:
                out = torch.empty(g.output_shapes(feeds)[out_name], dtype=g.dtypes[out_name], device=self.device)
                g.run(feeds, {out_name: out, **cache_out})
                results.append(out)
        return torch.cat(results, dim=2)

    # the VAE: BuildBackend's batching and tiling around _stream, under inference mode

    @torch.inference_mode()
    def vae_encode(self, video):
        return super().vae_encode(video)

    @torch.inference_mode()
    def vae_decode(self, latents):
        return super().vae_decode(latents)
