"""The one path every graph takes from a torch module to a checked ONNX file.

`export_graph(spec, out_dir)`:

1. `torch.onnx.export(..., dynamo=True)` at the requested opset (23 by
   default: scaled_dot_product_attention becomes ONNX `Attention`, RMS norms
   may become `RMSNormalization`), with the dynamic axes of the spec;
2. constant folding and dead-code removal on the in-memory IR
   (onnxscript's optimizer, the same one polygraphy and the exporter use),
   which never needs the whole model serialised in one protobuf;
3. saving: one `NAME.onnx`, plus one `NAME.onnx.data` holding every weight
   when the weights pass `EXTERNAL_DATA_THRESHOLD` (protobuf cannot hold
   2 GiB); the files are written under a temporary directory and renamed into
   `out_dir` only once complete and checked, so a failure leaves nothing
   behind;
4. `onnx.checker.check_model` on the path (the path form works past 2 GiB)
   and `onnx.shape_inference.infer_shapes_path` so that every intermediate
   tensor carries a shape;
5. a `GraphRecord`: input / output names, dtypes and shapes (symbolic axes
   by name), op-type counts, weight bytes and the largest batch one call may
   take so that no tensor reaches 2^31 elements (TensorRT's limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# TensorRT: the volume of any one tensor must stay below 2^31 elements.
TRT_MAX_ELEMENTS = 2**31 - 1
# protobuf's hard limit is 2 GiB; go external a little before it.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
# Largest batch recorded when nothing in a graph comes near the limit.
MAX_BATCH_CAP = 1024

from ..build_format import ONNX_DTYPE_NAMES  # noqa: E402
from ..errors import ExportError  # noqa: E402
from ..interrupts import raise_if_interrupted  # noqa: E402
from ..shape_expr import eval_dim_expr  # noqa: E402


@dataclass
class GraphSpec:
    """What to export.

    module: called as `module(*args)`; its forward's parameter names must be
        `input_names` (the dynamic axes are given by those names).
    dynamic_axes: input name -> {axis: symbol}. The same symbol on several
        inputs is one dimension. `symbol_ranges` gives (min, max) per symbol
        (default (1, 4096)). Derived axes: `derived_axes` maps input name ->
        {axis: (symbol, factor)} for an axis that is `factor` times a symbol.
    precision: the precision written in the graph ("fp32", "fp16", "bf16").
    meta: anything the build wants recorded with the graph.
    """

    name: str
    module: torch.nn.Module
    args: tuple
    input_names: Sequence[str]
    output_names: Sequence[str]
    precision: str
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    derived_axes: Mapping[str, Mapping[int, tuple[str, int]]] = field(default_factory=dict)
    symbol_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # value each non-batch symbol takes when sizing the largest activation
    symbol_sizes: Mapping[str, int] = field(default_factory=dict)
    batch_symbol: str = "batch"
    # When the module takes lists of tensors: (argument name, count) in order,
    # count 0 for a plain tensor; input_names are the flattened inputs.
    arg_groups: Sequence[tuple[str, int]] | None = None
    meta: dict = field(default_factory=dict)
    # torch custom op -> onnxscript function, for ops torch.onnx cannot translate
    # itself (the FP8 Q/DQ ops of tempomaster.calibration.fp8).
    translations: Mapping[Any, Callable] | None = None
    # weights in NAME.onnx.data: True / False, or None for "past EXTERNAL_DATA_THRESHOLD"
    external_data: bool | None = None


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: list  # ints and symbol names

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class GraphRecord:
    name: str
    file: str  # relative to the build's onnx/ directory
    external_data: str | None
    precision: str
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: dict[str, int]
    weight_bytes: int
    max_batch: int
    largest_activation: dict
    export_seconds: float
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = [t.as_dict() for t in self.inputs]
        d["outputs"] = [t.as_dict() for t in self.outputs]
        return d


# ----------------------------------------------------------------------------
# Dummy inputs
# ----------------------------------------------------------------------------


def random_like_spec(
    shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator | None = None, scale: float = 1.0
) -> torch.Tensor:
    return (torch.randn(tuple(shape), generator=generator) * scale).to(dtype)


# ----------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------


def _torch_dynamic_shapes(spec: GraphSpec) -> dict | None:
    if not spec.dynamic_axes and not spec.derived_axes:
        return None
    dims: dict[str, Any] = {}

    def dim(symbol: str):
        if symbol not in dims:
            lo, hi = spec.symbol_ranges.get(symbol, (1, 4096))
            dims[symbol] = torch.export.Dim(symbol, min=lo, max=hi)
        return dims[symbol]

    shapes: dict[str, Any] = {}
    for name in spec.input_names:
        axes = {}
        for axis, symbol in spec.dynamic_axes.get(name, {}).items():
            axes[axis] = dim(symbol)
        for axis, (symbol, factor) in spec.derived_axes.get(name, {}).items():
            axes[axis] = dim(symbol) * factor
        shapes[name] = axes or None
    if spec.arg_groups is None:
        return shapes
    grouped: dict[str, Any] = {}
    flat = iter(spec.input_names)
    for arg, count in spec.arg_groups:
        if count == 0:
            grouped[arg] = shapes[next(flat)]
        else:
            grouped[arg] = [shapes[next(flat)] for _ in range(count)]
    return grouped


def _quiet_export(module, args, spec: GraphSpec, opset: int):
    import logging
    import warnings

    dynamic_shapes = _torch_dynamic_shapes(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # the exporter prints its progress; keep the build's output readable
        import io

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
                custom_translation_table=dict(spec.translations) if spec.translations else None,
            )
    return program


def _keep_qdq(node) -> bool | None:
    # Folding DequantizeLinear(FP8 initializer) would turn FP8 weights back into
    # high-precision ones; Q/DQ pairs are what TensorRT reads as quantization.
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def _optimize_ir(model) -> None:
    """Constant folding + unused-node removal on the onnx_ir model, in place (Q/DQ kept)."""
    import onnxscript.optimizer as opt

    opt.optimize_ir(model, num_iterations=2, should_fold=_keep_qdq)
    opt.remove_unused_nodes(model)


def _weight_bytes_ir(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _check_io_names(model, spec: GraphSpec) -> None:
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != list(spec.input_names):
        raise ExportError(f"{spec.name}: exported inputs {got_in} differ from the declared {list(spec.input_names)}")
    if got_out != list(spec.output_names):
        raise ExportError(f"{spec.name}: exported outputs {got_out} differ from the declared {list(spec.output_names)}")


def export_graph(
    spec: GraphSpec,
    out_dir: str | os.PathLike,
    opset: int = 23,
    external_data: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> GraphRecord:
    """Export one graph to `out_dir/NAME.onnx` (+ `NAME.onnx.data`); return its record.

    external_data: None = only when the weights pass EXTERNAL_DATA_THRESHOLD.
    Refuses to overwrite an existing file.
    """
    import onnx
    import onnx_ir as ir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_name = f"{spec.name}.onnx"
    data_name = f"{spec.name}.onnx.data"
    for n in (onnx_name, data_name):
        if (out_dir / n).exists():
            raise FileExistsError(f"{out_dir / n} exists; export writes into a fresh directory")
    say = log or (lambda _m: None)
    t0 = time.perf_counter()

    spec.module.eval()
    try:
        program = _quiet_export(spec.module, spec.args, spec, opset)
    except Exception as err:  # torch.export / translation failures are long; keep the head
        raise_if_interrupted()  # Ctrl-C that the exporter turned into an error of its own
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(err).__name__}: {str(err)[:2000]}") from err
    model = program.model
    _check_io_names(model, spec)
    say(f"{spec.name}: exported in {time.perf_counter() - t0:.1f}s, optimising")
    _optimize_ir(model)
    _check_io_names(model, spec)
    weight_bytes = _weight_bytes_ir(model)
    if external_data is None:
        external_data = spec.external_data
    use_external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data

    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=out_dir))
    try:
        path = tmp / onnx_name
        if use_external:
            ir.save(model, path, external_data=data_name)
        else:
            ir.save(model, path)
        del program, model
        say(
            f"{spec.name}: saved ({weight_bytes / 2**20:.1f} MiB of weights{', external data' if use_external else ''}), checking"
        )
        try:
            onnx.checker.check_model(str(path))
        except Exception as err:
            raise ExportError(f"{spec.name}: onnx.checker rejected the graph: {err}") from err
        try:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(path), check_type=True, strict_mode=False, data_prop=True
            )
        except Exception as err:
            raise ExportError(f"{spec.name}: ONNX shape inference failed: {err}") from err
        proto = onnx.load(str(path), load_external_data=False)
        inputs = [_tensor_info(v) for v in proto.graph.input]
        outputs = [_tensor_info(v) for v in proto.graph.output]
        ops = dict(sorted(Counter(_all_op_types(proto.graph)).items()))
        max_batch, largest = largest_batch(proto, spec.batch_symbol, spec.symbol_sizes)
        del proto
        gc.collect()
        for n in (onnx_name, data_name):
            if (tmp / n).exists():
                os.replace(tmp / n, out_dir / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    say(f"{spec.name}: done in {seconds:.1f}s, max batch {max_batch}")
    return GraphRecord(
        name=spec.name,
        file=onnx_name,
        external_data=data_name if use_external else None,
        precision=spec.precision,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        ops=ops,
        weight_bytes=weight_bytes,
        max_batch=max_batch,
        largest_activation=largest,
        export_seconds=round(seconds, 2),
        meta=dict(spec.meta),
    )


# ----------------------------------------------------------------------------
# Reading a graph back
# ----------------------------------------------------------------------------


def _dims(type_proto) -> list | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    out = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _tensor_info(value_info) -> TensorInfo:
    elem = value_info.type.tensor_type.elem_type
    return TensorInfo(value_info.name, ONNX_DTYPE_NAMES.get(elem, f"onnx:{elem}"), _dims(value_info.type) or [])


def graph_io(path: str | os.PathLike) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Input and output names / dtypes / shapes of an ONNX file (weights not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return [_tensor_info(v) for v in proto.graph.input], [_tensor_info(v) for v in proto.graph.output]


def _all_op_types(graph, domain_prefix: bool = True):
    for node in graph.node:
        name = node.op_type if node.domain in ("", "ai.onnx") or not domain_prefix else f"{node.domain}::{node.op_type}"
        yield name
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_op_types(attr.g, domain_prefix)
            for g in attr.graphs:
                yield from _all_op_types(g, domain_prefix)


def _eval_dim(d, symbols: Mapping[str, int]) -> int | None:
    if isinstance(d, int):
        return d
    if d is None:
        return None
    if d in symbols:
        return symbols[d]
    try:  # derived axes come out as expressions, e.g. "120*frames"
        return eval_dim_expr(d, symbols)
    except ValueError:
        return None


def largest_batch(
    proto, batch_symbol: str = "batch", symbol_sizes: Mapping[str, int] | None = None, limit: int = TRT_MAX_ELEMENTS
) -> tuple[int, dict]:
    """Largest batch for which every tensor of the graph stays within `limit` elements.

    Each tensor with a shape (inputs, outputs, every inferred intermediate) is
    sized at batch 1 and batch 2: the difference is its growth per batch item
    (0 for tensors that do not depend on the batch). Internal buffers of fused
    ops (the score matrix inside `Attention`) are not graph tensors and are
    not counted: TensorRT runs `Attention` as one fused layer.
    """
    sizes = dict(symbol_sizes or {})
    values = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    best_batch = MAX_BATCH_CAP
    largest = {"tensor": None, "elements_per_item": 0, "shape": None}
    unknown = []
    for v in values:
        dims = _dims(v.type)
        if dims is None:
            unknown.append(v.name)
            continue
        at = []
        for b in (1, 2):
            vals = [_eval_dim(d, {**sizes, batch_symbol: b}) for d in dims]
            at.append(None if any(x is None for x in vals) else math.prod(vals))
        if at[0] is None:
            unknown.append(v.name)
            continue
        per_item = at[1] - at[0]
        fixed = at[0] - per_item
        if per_item <= 0:
            if at[0] > limit:
                raise ExportError(
                    f"tensor {v.name} {dims} has {at[0]:,} elements, past TensorRT's 2^31 limit at any batch"
                )
            continue
        if per_item > largest["elements_per_item"]:
            largest = {"tensor": v.name, "elements_per_item": per_item, "shape": dims}
        best_batch = min(best_batch, (limit - fixed) // per_item)
    if best_batch < 1:
        raise ExportError(f"tensor {largest['tensor']} passes TensorRT's 2^31 element limit even at batch 1")
    largest["limit"] = limit
    if unknown:
        largest["unsized_tensors"] = len(unknown)
    return int(best_batch), largest


def cast_module(module: torch.nn.Module, dtype: torch.dtype, copy: bool = True) -> torch.nn.Module:
    """`module` with its floating-point parameters in `dtype`.

    Unchanged when it already is; otherwise a cast copy (copy=True, the
    caller's module keeps its weights) or the module itself cast in place
    (copy=False: no second copy of a 14B model in memory).
    """
    import copy as _copy

    current = next(module.parameters()).dtype
    if current == dtype:
        return module
    target = _copy.deepcopy(module) if copy else module
    return target.to(dtype)
