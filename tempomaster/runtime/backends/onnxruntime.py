"""The onnxruntime backend: a build's exported graphs behind the same seam.

Every graph's session is created when the backend opens (`from_build`), so
that a generation's clock never includes it. Inputs and outputs
are bound to torch tensors' memory through IOBinding (no copies on either
side), the VAE's causal caches ping-pong between two sets of preallocated
tensors, and a batch larger than a graph's recorded safe batch is split into
several calls.

A tiled build (`tm-export onnx --tile`) holds VAE graphs at the tile's shape;
the backend then runs them tile by tile and blends on the host with the same
code as the torch VAE (`models.vae_tiling`). Tiling must be asked for
(`tile=True`) exactly when the build has it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...dtypes import ONNX_ELEMENT_TYPES, TENSOR_DTYPES
from ...engines.manifest import Manifest, ManifestError, load_manifest, verify_files
from ...errors import MissingDependencyError
from ...models.vae_tiling import TileSpec
from .base import (
    batch_slices,
    model_info_from_manifest,
)
from .build_backend import BuildBackend, build_tiling


def _providers() -> tuple[list, torch.device]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError(
            "the onnxruntime backend needs onnxruntime: in the repository run pip install -e '.[ort]' "
            "(CPU) or pip install -e '.[trt]' (GPU, with onnxruntime-gpu)"
        ) from None

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        # The current CUDA device, named explicitly: onnxruntime would take device 0 (one process per GPU sets it).
        index = torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], torch.device("cuda", index)
    return ["CPUExecutionProvider"], torch.device("cpu")


class GraphRunner:
    """One ONNX graph: its session (created by `open()`, or on first use) and calls bound to torch tensors."""

    def __init__(self, manifest: Manifest, name: str, providers: list, device: torch.device, threads: int = 0):
        self.name = name
        self.threads = threads  # intra-op threads; 0 = onnxruntime's default
        self.spec = manifest.graph(name)
        self.path = manifest.path(name)
        self.max_batch = int(self.spec["max_batch"])
        self.inputs = {i["name"]: i for i in self.spec["inputs"]}
        self.outputs = {o["name"]: o for o in self.spec["outputs"]}
        self._providers = providers
        self._device = device
        self._session = None

    def open(self) -> None:
        """Create the session now (loading and optimizing the graph), not in the first call."""
        self.session  # noqa: B018 - the property creates it

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.threads
            self._session = ort.InferenceSession(str(self.path), options, providers=self._providers)
            self._check_session_io()
        return self._session

    def _check_session_io(self) -> None:
        """The graph file must have exactly the inputs and outputs the manifest promises."""
        have_in = [i.name for i in self._session.get_inputs()]
        have_out = [o.name for o in self._session.get_outputs()]
        for kind, have, want in (("inputs", have_in, list(self.inputs)), ("outputs", have_out, list(self.outputs))):
            if sorted(have) != sorted(want):
                missing = sorted(set(want) - set(have))
                extra = sorted(set(have) - set(want))
                raise ManifestError(
                    f"{self.path}: graph {kind} differ from the manifest: missing {missing or 'none'}, unexpected {extra or 'none'}"
                )

    def dtype(self, name: str) -> torch.dtype:
        spec = self.inputs.get(name) or self.outputs[name]
        return TENSOR_DTYPES[spec["dtype"]]

    def shape(self, name: str, batch: int, symbols: dict[str, int] | None = None) -> tuple[int, ...]:
        """The concrete shape of `name`: "batch" is `batch`; other symbols ("frames", "24*frames") from `symbols`."""
        spec = self.inputs.get(name) or self.outputs[name]
        values = {"batch": batch, **(symbols or {})}
        return tuple(_resolve_dim(d, values, f"{self.path}: dimension {d!r} of {name}") for d in spec["shape"])

    def bind_symbols(self, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
        """Read every plain symbol's value off the inputs (e.g. "frames" of x); check the rest of each shape."""
        symbols: dict[str, int] = {}
        for name, tensor in feeds.items():
            dims = self.inputs[name]["shape"]
            if len(dims) != tensor.ndim:
                raise ManifestError(
                    f"{self.path}: input {name} has {len(dims)} dimensions in this build, got {tuple(tensor.shape)}"
                )
            for d, got in zip(dims, tensor.shape):
                if isinstance(d, str) and d.isidentifier() and d != "batch":
                    if symbols.setdefault(d, int(got)) != int(got):
                        raise ManifestError(f"{self.path}: {d} is {symbols[d]} in one input and {got} in {name}")
        for name, tensor in feeds.items():
            self.check_input(name, tensor, symbols)
        return symbols

    def check_input(self, name: str, tensor: torch.Tensor, symbols: dict[str, int] | None = None) -> None:
        """Raise ManifestError unless `tensor`'s shape is the build's for `name` (batch = tensor.shape[0])."""
        want = self.shape(name, tensor.shape[0], symbols)
        if tuple(tensor.shape) != want:
            raise ManifestError(
                f"{self.path}: input {name} has shape {tuple(want)} in this build, got {tuple(tensor.shape)}: "
                "the build was exported for another shape; export one for this request (tm-export onnx)"
            )

    def run(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run once with every input and output bound to the given tensors' memory.

        Each tensor is contiguous, in its graph's dtype and shape (`prepare`, `empty`), on the session's device.
        """
        if self._device.type == "cuda":
            # onnxruntime reads the bound buffers on its own stream: torch's writes to them must be done first.
            torch.cuda.current_stream(self._device).synchronize()
        binding = self.session.io_binding()
        device_type = "cuda" if self._device.type == "cuda" else "cpu"
        device_id = self._device.index or 0
        for name, tensor in feeds.items():
            binding.bind_input(
                name, device_type, device_id, ONNX_ELEMENT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr()
            )
        for name, tensor in outputs.items():
            binding.bind_output(
                name, device_type, device_id, ONNX_ELEMENT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr()
            )
        self.session.run_with_iobinding(binding)

    def prepare(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Cast to the graph's dtype on the session's device, contiguous (a no-op when it already is); same shape."""
        return tensor.to(self._device, self.dtype(name)).contiguous()

    def empty(self, name: str, batch: int, symbols: dict[str, int] | None = None) -> torch.Tensor:
        return torch.empty(self.shape(name, batch, symbols), dtype=self.dtype(name), device=self._device)


def _resolve_dim(d, values: dict[str, int], what: str) -> int:
    """A manifest dimension: an int, a symbol, or a product "k*symbol" (e.g. rope's "24*frames")."""
    if isinstance(d, int):
        return d
    if isinstance(d, str):
        factor, _, symbol = d.rpartition("*")
        if symbol in values and (not factor or factor.isdigit()):
            return int(factor or 1) * values[symbol]
    raise ManifestError(f"{what} cannot be resolved from the inputs")


# Sequences per DiT call on the CPU execution provider. Its GEMMs cost more per row past a
# few thousand rows (measured, 2-core CPU: [B, 512, 1536] x [1536, 1536] at 15.1 ms per
# sequence for B = 1-2, 17.1 for B = 8; one wan-1.3b-shaped DiT call at 32x32, B = 8: 11.7 s
# whole, 10.5 s as two calls of 4, the same values bit for bit). At real frame sizes one
# sequence is tens of thousands of rows, so the split costs nothing there.
CPU_DIT_BATCH = 4


class OnnxRuntimeBackend(BuildBackend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, threads: int = 0, tile: bool | TileSpec = False):
        self.manifest = manifest
        self.tile, self._tile_suffix = build_tiling(manifest, tile)
        self.spatial_ratio = int(manifest.shape["height"]) // int(manifest.shape["latent_height"])
        providers, self.device = _providers()
        self.providers = providers
        self.graphs = {name: GraphRunner(manifest, name, providers, self.device, threads) for name in manifest.graphs}
        self.info = model_info_from_manifest(manifest.data)

    @classmethod
    def from_build(
        cls, build_dir: str | Path, verify: bool = True, threads: int = 0, tile: bool | TileSpec = False
    ) -> OnnxRuntimeBackend:
        """Open a tm-export build; every file's sha256 is checked against the manifest first.

        tile: run the VAE tiled, as the release's `"tile": true` does; the
        build must have been exported with the same choice."""
        manifest = load_manifest(build_dir)
        cls.check_build(manifest, build_dir, tile)
        if verify:
            verify_files(manifest)
        backend = cls(manifest, threads, tile)
        backend.open_sessions()
        return backend

    def open_sessions(self) -> None:
        """Create every graph's session: the backend opens ready, the first calls run at full speed."""
        for graph in self.graphs.values():
            graph.open()

    # -- the three calls ---------------------------------------------------------

    def encode_text(self, ids, mask):
        g = self.graphs["t5"]
        ids, mask = g.prepare("ids", ids), g.prepare("mask", mask)
        out = g.empty("embeddings", ids.shape[0])
        for s in batch_slices(ids.shape[0], g.max_batch):
            g.run({"ids": ids[s], "mask": mask[s]}, {"embeddings": out[s]})
        return out

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        g = self.graphs["dit"]
        feeds = {
            "x": g.prepare("x", x),
            "y": g.prepare("y", y),
            "context": g.prepare("context", context),
            "rope_cos": g.prepare("rope_cos", rope_cos),
            "rope_sin": g.prepare("rope_sin", rope_sin),
        }
        symbols = g.bind_symbols(feeds)  # "frames" differs between stages in some builds
        t = g.prepare("timestep", timestep.reshape(-1)[:1])
        out = g.empty("velocity", x.shape[0], symbols)
        per_call = min(g.max_batch, CPU_DIT_BATCH) if self.device.type == "cpu" else g.max_batch
        for s in batch_slices(x.shape[0], per_call):
            # Slices along dim 0 of contiguous tensors stay contiguous: bound in place.
            g.run({**{k: v[s] for k, v in feeds.items()}, "timestep": t}, {"velocity": out[s]})
        return out

    def _stream(self, first: GraphRunner, rest: GraphRunner, data_name: str, out_name: str, pieces: list[torch.Tensor]):
        """Run the causal step graphs over `pieces` (time slices), carrying every cache tensor."""
        caches = first.spec["meta"]["caches"]
        batch = pieces[0].shape[0]
        current = [
            torch.zeros(first.shape(c["input"], batch), dtype=first.dtype(c["input"]), device=self.device)
            for c in caches
        ]
        spare = [torch.empty_like(t) for t in current]
        results = []
        for k, piece in enumerate(pieces):
            g = first if k == 0 else rest
            out = g.empty(out_name, batch)
            feeds = {data_name: g.prepare(data_name, piece)}
            g.check_input(data_name, feeds[data_name])
            feeds.update({c["input"]: t for c, t in zip(caches, current)})
            outputs = {out_name: out, **{c["output"]: t for c, t in zip(caches, spare)}}
            g.run(feeds, outputs)
            current, spare = spare, current
            results.append(out)
        return torch.cat(results, dim=2)
