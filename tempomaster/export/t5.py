"""umT5 encoder -> t5.onnx.

    inputs   ids         [B, text_len] int64 (512; the toy preset 32)
             mask        [B, text_len] int64 (1 = real token, 0 = padding)
    outputs  embeddings  [B, text_len, dim]   graph dtype, zero where mask == 0

B is dynamic. umT5-XXL overflows float16, so the graph is float32 or
bfloat16 only: a float16 build exports it in bfloat16 (`T5_PRECISION_FOR`,
overridable) and the manifest records the graph's own precision.
"""

from __future__ import annotations

import torch

from ..dtypes import PRECISION_DTYPES
from .onnx_utils import GraphSpec, cast_module

INPUT_NAMES = ("ids", "mask")
OUTPUT_NAMES = ("embeddings",)

# build precision -> precision of the T5 graph
T5_PRECISION_FOR = {"fp32": "fp32", "fp16": "bf16", "bf16": "bf16"}


class T5Graph(torch.nn.Module):
    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, ids, mask):
        return self.t5(ids, mask)


def t5_example_inputs(cfg, batch: int, generator: torch.Generator | None = None) -> tuple:
    length = cfg.text_len
    ids = torch.randint(1, cfg.vocab_size, (batch, length), generator=generator, dtype=torch.int64)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    ids = ids * mask
    return ids, mask


def t5_spec(t5, precision: str, copy: bool = True) -> GraphSpec:
    if precision == "fp16":
        raise ValueError("umT5 cannot be exported in fp16 (its activations overflow); use bf16 or fp32")
    model = cast_module(t5, PRECISION_DTYPES[precision], copy=copy).eval()
    cfg = t5.cfg
    return GraphSpec(
        name="t5",
        module=T5Graph(model),
        args=t5_example_inputs(cfg, 2),
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        precision=precision,
        dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"}},
        symbol_ranges={"batch": (1, 1024)},
        meta={"text_len": cfg.text_len, "dim": cfg.dim},
    )
