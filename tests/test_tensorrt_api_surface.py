"""Every TensorRT name our code uses is bound in the TensorRT 11.4 Python bindings.

The `tensorrt-cu13-bindings` wheel (the `[dev]` extra) installs on a CPU
machine as the module `tensorrt_bindings`; importing it fails without
libnvinfer, but its `tensorrt.so` holds every bound name as a string. The
names are found by reading our source (tests/trt_api_surface.py), not from a
list kept by hand.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import trt_api_surface as api

ROOT = Path(__file__).resolve().parents[1] / "tempomaster"
# The modules that hold TensorRT calls; the test below makes sure no other module does.
TRT_MODULES = ("engines/builder.py", "engines/trt_env.py", "runtime/backends/tensorrt.py")


def _bindings_dir() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or spec.origin is None:
        pytest.skip("tensorrt-cu13-bindings is not installed (pip install -e '.[dev]')")
    return Path(spec.origin).parent


@pytest.fixture(scope="module")
def bindings():
    d = _bindings_dir()
    return api.bound_strings(d / "tensorrt.so"), api.python_level_names(d / "__init__.py")


def test_bindings_are_11_4():
    _bindings_dir()
    try:
        v = version("tensorrt-cu13-bindings")
    except PackageNotFoundError:  # pragma: no cover
        pytest.skip("tensorrt-cu13-bindings metadata missing")
    assert v.startswith("11.4."), v


def _uses_tensorrt(source: str) -> bool:
    return "import_tensorrt(" in source or "import tensorrt" in source or "trt." in source


def test_every_module_using_tensorrt_is_analysed():
    found = sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*.py")
        if _uses_tensorrt(p.read_text()) and api.used_names(p.read_text())
    )
    assert found == sorted(TRT_MODULES)
    for rel in TRT_MODULES:
        assert api.check_module_aliases((ROOT / rel).read_text()) == [], rel


def _all_used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for rel in TRT_MODULES:
        for name, lines in api.used_names((ROOT / rel).read_text()).items():
            used.setdefault(name, set()).update(f"{rel}:{n}" for n in lines)
    return used


def test_every_tensorrt_name_we_use_is_bound(bindings):
    strings, py_names = bindings
    used = _all_used()
    # the analysis reaches module attributes, methods on objects passed between
    # functions, properties and comprehension variables: a floor on what it finds
    assert {
        "Builder",
        "OnnxParser",
        "BuilderFlag",
        "STRIP_PLAN",
        "create_network",
        "parse_from_file",
        "node_name",
        "set_shape",
        "build_serialized_network",
        "serialize",
        "name",
        "dtype",
        "Runtime",
        "deserialize_cuda_engine",
        "refit_from_file",
        "set_input_shape",
        "set_tensor_address",
        "execute_async_v3",
        "get_tensor_profile_shape",
        "set_device_memory",
        "weight_streaming_budget_v2",
        "ILogger",
        "__version__",
    } <= set(used), sorted(used)
    missing = {n: sorted(where)[:3] for n, where in used.items() if api.name_evidence(n, strings, py_names) is None}
    assert not missing, f"not bound in TensorRT 11.4: {missing}"


def test_names_without_a_string_of_their_own(bindings):
    """Honest about the weak evidence: a name stored only as the tail of a longer string."""
    strings, py_names = bindings
    assert api.name_evidence("REFIT", strings, py_names) == "tail of 'INCLUDE_REFIT'"
    assert api.name_evidence("EXCLUDE_LEAN_RUNTIME", strings, py_names) == "string"  # one string, two enums
    assert api.name_evidence("ERROR", strings, py_names).startswith("tail of ")  # ILogger.ERROR: pyCore.cpp binds it
    # names TensorRT 11 removed, and ones it never had, are absent in every form
    for gone in (
        "FP16",
        "platform_has_fast_fp16",
        "supports_model",
        "device_memory_size",
        "max_workspace_size",
        "get_device_memory_size_for_profile",
        "create_execution_context_without_device_memory",
        "int8_calibrator",
        "load_weights",
        "getEngineValidity",
    ):
        assert api.name_evidence(gone, strings, py_names) is None, gone


@pytest.mark.parametrize(
    "rel, old, new, wrong",
    [
        # a removed builder flag on the module
        ("engines/builder.py", "trt.BuilderFlag.STRIP_PLAN", "trt.BuilderFlag.FP16", "FP16"),
        # a method on an object that reached the function as a parameter (network from _parse)
        ("engines/builder.py", "network.num_inputs", "network.num_input_tensors", "num_input_tensors"),
        # a property read through our own property (self.engine) on a TensorRT 10 name
        (
            "runtime/backends/tensorrt.py",
            "engine.device_memory_size_v2",
            "engine.device_memory_size",
            "device_memory_size",
        ),
        # a method on a comprehension variable (parser errors)
        ("engines/builder.py", "e.node_operator()", "e.node_op()", "node_op"),
    ],
)
def test_a_wrong_name_fails(bindings, rel, old, new, wrong):
    strings, py_names = bindings
    source = (ROOT / rel).read_text()
    assert old in source
    bad = api.used_names(source.replace(old, new))
    assert wrong in bad
    assert api.name_evidence(wrong, strings, py_names) is None


def test_aliases_under_another_name_are_reported():
    assert api.check_module_aliases("import tensorrt as rt\n")
    assert api.check_module_aliases("def f():\n    tensorrt = import_tensorrt()\n")
    assert not api.check_module_aliases("def f():\n    trt = import_tensorrt()\n")


def test_our_own_objects_are_not_tensorrt_names():
    src = (
        "def make(trt):\n"
        "    class L(trt.ILogger):\n"
        "        pass\n"
        "    return L()\n"
        "def f(trt):\n"
        "    log = make(trt)\n"
        "    b = trt.Builder(log)\n"
        "    return log.errors, b.create_network()\n"
    )
    used = api.used_names(src)
    assert "errors" not in used
    assert {"ILogger", "Builder", "create_network"} <= set(used)
