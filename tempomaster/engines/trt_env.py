"""What this machine offers TensorRT: the module, a CUDA GPU, their versions.

`tensorrt` is imported only here and only when asked (polygraphy's lazy
import style): the CPU path of the package never needs it. Everything that
needs TensorRT or a GPU raises `MissingDependencyError` (exit code 3) with
one line saying what is missing and how to finish the job elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MissingDependencyError

TENSORRT_REQUIREMENT = "TensorRT 11.4 (pip install 'tempomaster-trt[trt]')"
# The major version this package's TensorRT calls are written for: 12 may rename or drop them,
# and plans never cross a major version.
TENSORRT_MAJOR = 11


def resume_hint(build_dir) -> str:
    return f"run `tm-export build --resume {build_dir}` on a machine with an NVIDIA GPU and TensorRT 11.4 to finish the job"


def import_tensorrt(purpose: str = "this step"):
    """The `tensorrt` module, or MissingDependencyError naming what is missing."""
    try:
        import tensorrt
    except ImportError as err:
        # The bindings import but fail to load libnvinfer on a machine without the runtime libraries.
        raise MissingDependencyError(
            f"{purpose} needs {TENSORRT_REQUIREMENT}; importing tensorrt failed: {err}"
        ) from None
    except OSError as err:  # pragma: no cover - a broken install
        raise MissingDependencyError(
            f"{purpose} needs {TENSORRT_REQUIREMENT}; loading its libraries failed: {err}"
        ) from None
    check_major_version(str(getattr(tensorrt, "__version__", "unknown")), purpose)
    return tensorrt


def check_major_version(version: str, purpose: str = "this step") -> None:
    """MissingDependencyError unless `version` is TensorRT TENSORRT_MAJOR.x: checked before anything is built or loaded."""
    major = version.split(".", 1)[0]
    if major != str(TENSORRT_MAJOR):
        raise MissingDependencyError(
            f"{purpose} is written for TensorRT {TENSORRT_MAJOR}.x, this machine has TensorRT {version}; "
            f"install {TENSORRT_REQUIREMENT}"
        )


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except MissingDependencyError:
        return False
    return True


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    index: int

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def require_cuda(purpose: str = "this step") -> None:
    """MissingDependencyError (one line) unless torch sees a CUDA GPU; creates no CUDA context."""
    import torch

    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise MissingDependencyError(f"{purpose} needs an NVIDIA GPU with CUDA; {why} (torch {torch.__version__})")


def require_tensorrt_machine(purpose: str = "this step"):
    """The GPU first, then the `tensorrt` module (at major version 11): the same error whichever path asks."""
    require_cuda(purpose)
    return import_tensorrt(purpose)


def cuda_device(purpose: str = "this step", index: int | None = None) -> DeviceInfo:
    """The CUDA device TensorRT will use (`index`, else torch's current one), or MissingDependencyError."""
    import torch

    require_cuda(purpose)
    idx = torch.cuda.current_device() if index is None else int(index)
    props = torch.cuda.get_device_properties(idx)
    return DeviceInfo(props.name, (int(props.major), int(props.minor)), int(props.total_memory), idx)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def versions(trt) -> dict:
    """TensorRT and ONNX parser versions as recorded beside every plan."""
    return {"tensorrt": str(trt.__version__), "onnx_parser": int(trt.get_nv_onnx_parser_version())}


def make_logger(trt, sink, verbose: bool = False):
    """A trt.ILogger that forwards to `sink(line)` polygraphy-style ([E]/[W]/[I]/[V]) and keeps the errors.

    The reason TensorRT refuses a plan or a network only reaches its logger,
    so the last errors are kept to put into the exception we raise.
    """

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= int(trt.ILogger.ERROR):
                self.errors.append(msg)
                sink(f"[E] TensorRT: {msg}")
            elif level == int(trt.ILogger.WARNING):
                sink(f"[W] TensorRT: {msg}")
            elif verbose and level == int(trt.ILogger.INFO):
                sink(f"[I] TensorRT: {msg}")
            elif verbose and level == int(trt.ILogger.VERBOSE):
                sink(f"[V] TensorRT: {msg}")

    return _Logger()
