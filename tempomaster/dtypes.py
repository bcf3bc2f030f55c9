"""The one table of dtype names: precision flags and manifest tensor types <-> torch dtypes and ONNX types."""

from __future__ import annotations

import torch

# --dtype / --precision names of the floating-point model dtypes
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the manifest's tensor dtypes (ONNX's names), as the backends bind them
TENSOR_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
# torch dtypes -> ONNX TensorProto element types (onnxruntime's IOBinding takes these, bf16 included)
ONNX_ELEMENT_TYPES = {
    torch.float32: 1,
    torch.float16: 10,
    torch.bfloat16: 16,
    torch.int64: 7,
    torch.int32: 6,
    torch.bool: 9,
}
