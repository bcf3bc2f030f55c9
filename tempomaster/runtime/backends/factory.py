"""Which backend answers a request, and how each one is made, in this process or on a rank's device.

A factory is a small picklable description of a backend (paths, dtype,
flags; no open session, no tensor). The launcher sends it to every rank,
where calling it with the rank's device opens the backend there and returns
(backend, tokenizer). A single process calls the same factory once.
Nothing here imports torch, onnxruntime or TensorRT before a backend is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import UsageError
from .base import Backend

if TYPE_CHECKING:
    import torch

    from ..request import GenerateOptions

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def choose_backend(engines: str | Path | None, backend: str | None = None, cuda_graphs: bool = False) -> str:
    """The backend `tm-run generate` uses.

    backend given: that one (`--backend`; onnxruntime and tensorrt need
    `--engines BUILD`). Otherwise: torch without a build; with a build,
    tensorrt when it has plans and this machine has a CUDA GPU and TensorRT,
    onnxruntime otherwise. cuda_graphs (`--cuda-graphs`) needs tensorrt.
    """
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch" or (engines is None and backend is None):
        chosen = "torch"
    elif engines is None:
        raise UsageError(
            f"--backend {backend} runs a build's graphs: give --engines BUILD (from tm-export onnx / build)"
        )
    elif backend is not None:
        chosen = backend
    else:
        from ...engines.manifest import load_manifest
        from ...engines.plans import has_plans
        from ...engines.trt_env import cuda_available, tensorrt_available

        manifest = load_manifest(engines)
        chosen = "tensorrt" if has_plans(manifest) and cuda_available() and tensorrt_available() else "onnxruntime"
    if cuda_graphs and chosen != "tensorrt":
        why = (
            ""
            if backend is not None
            else " (chosen because the build has no plans, or this machine has no GPU or TensorRT)"
        )
        raise UsageError(f"--cuda-graphs needs the tensorrt backend; the backend is {chosen}{why}")
    return chosen


def open_engine_backend(
    engines: str | Path,
    backend: str,
    *,
    cuda_graphs: bool = False,
    weight_streaming_budget: int | None = None,
    verify: bool = True,
    threads: int = 0,
    tile: bool = False,
    device_index: int | None = None,
) -> Backend:
    """The onnxruntime or tensorrt backend over a build (`choose_backend`'s answer).

    threads: onnxruntime's only; device_index: tensorrt's CUDA device (None: torch's current one).
    """
    if backend == "onnxruntime":
        if cuda_graphs:
            raise UsageError("--cuda-graphs needs --backend tensorrt")
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_build(engines, verify=verify, threads=threads, tile=tile)
    if backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend.from_build(
            engines,
            verify=verify,
            cuda_graphs=cuda_graphs,
            tile=tile,
            weight_streaming_budget=weight_streaming_budget,
            device_index=device_index,
        )
    raise UsageError(f"open_engine_backend serves onnxruntime and tensorrt, not {backend!r}")


@dataclass(frozen=True)
class TorchBackendFactory:
    """The torch backend over a preset's or checkpoints' models, on the device it is called with."""

    preset: str | None = None
    checkpoints: Path | None = None
    config: Path | None = None
    dtype: str = "fp32"
    tile: bool = False

    def __call__(self, device: torch.device):
        from ...dtypes import PRECISION_DTYPES
        from ...models.sources import load_model_set
        from .torch import TorchBackend

        dtype = PRECISION_DTYPES[self.dtype]
        # only a preset the user typed is a claim about the files (checked); a guessed one lent defaults only
        models = load_model_set(self.preset, self.checkpoints, self.config, dtype)
        return TorchBackend(models, dtype, device=device, tile=self.tile), models.tokenizer


@dataclass(frozen=True)
class OnnxRuntimeBackendFactory:
    """A build's graphs on onnxruntime (on a rank, the current CUDA device is set by the worker)."""

    engines: Path
    checkpoints: Path | None = None
    config: Path | None = None
    threads: int = 0
    tile: bool = False

    def __call__(self, device: torch.device):
        from .onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend.from_build(self.engines, threads=self.threads, tile=self.tile)
        return backend, backend.tokenizer(self.checkpoints, self.config)


@dataclass(frozen=True)
class TensorRTBackendFactory:
    """A build's plans on TensorRT, one engine instance per device: each rank deserialises every plan on its own GPU."""

    engines: Path
    checkpoints: Path | None = None
    config: Path | None = None
    cuda_graphs: bool = False
    weight_streaming_budget: int | None = None  # bytes; None: computed from the GPU's free memory
    tile: bool = False

    @staticmethod
    def device_index(device: torch.device) -> int:
        """The CUDA index the plans are opened on: the rank's device (torch's current one for a bare "cuda")."""
        import torch

        from ...engines.trt_env import require_cuda

        if device.type != "cuda":
            require_cuda("the tensorrt backend")  # the one-line "needs an NVIDIA GPU" where there is none
            raise UsageError(
                f"the tensorrt backend runs on a CUDA device, not {device}; use --device cuda or --devices 0,1,..."
            )
        return torch.cuda.current_device() if device.index is None else int(device.index)

    def __call__(self, device: torch.device):
        import torch

        index = self.device_index(device)
        # TensorRT deserialises a plan on the current CUDA device: set it before the runtime is made
        torch.cuda.set_device(index)
        backend = open_engine_backend(
            self.engines,
            "tensorrt",
            cuda_graphs=self.cuda_graphs,
            weight_streaming_budget=self.weight_streaming_budget,
            tile=self.tile,
            device_index=index,
        )
        return backend, backend.tokenizer(self.checkpoints, self.config)


def backend_factory(options: GenerateOptions, dtype: str, threads: int):
    """The factory for `tm-run generate`'s backend: torch over models, or onnxruntime / tensorrt over a build."""
    name = choose_backend(options.engines, options.backend, options.cuda_graphs)
    tile = bool(options.tile)
    if name == "torch":
        return TorchBackendFactory(options.preset, options.checkpoints, options.config, dtype, tile)
    if name == "onnxruntime":
        if options.cuda_graphs:
            raise UsageError("--cuda-graphs needs --backend tensorrt")
        return OnnxRuntimeBackendFactory(options.engines, options.checkpoints, options.config, threads, tile)
    from ...engines.builder import parse_size
    from ...engines.manifest import load_manifest
    from ...engines.plans import check_run_options
    from ...engines.trt_env import require_tensorrt_machine

    check_run_options(load_manifest(options.engines), cuda_graphs=options.cuda_graphs)
    # before any process starts or any plan is read: one device or many, the same one-line refusal
    require_tensorrt_machine("the tensorrt backend")
    budget = parse_size(options.weight_streaming_budget) if options.weight_streaming_budget else None
    return TensorRTBackendFactory(
        options.engines, options.checkpoints, options.config, options.cuda_graphs, budget, tile
    )
