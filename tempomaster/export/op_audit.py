"""Op audit: every node of an exported graph must be one TensorRT's ONNX parser supports.

The supported set is data (`trt_parser_ops.json`), transcribed from
onnx-tensorrt's docs/operators.md for TensorRT 10.15 (the file records where
it came from). An op is accepted when the table lists it as supported and it
is in the default ONNX domain; custom-domain ops (com.microsoft, ...) and
anything the table marks unsupported or does not list are failures. Ops inside
subgraphs (If/Loop bodies) are audited too. A Resize on bfloat16 data is a
failure too: the parser lists Resize, but TensorRT's strongly typed networks
do not run it in bf16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

TABLE_FILE = Path(__file__).with_name("trt_parser_ops.json")


from ..errors import OpAuditError  # noqa: E402


@cache
def load_table(path: str | None = None) -> dict:
    with open(path or TABLE_FILE, encoding="utf-8") as f:
        return json.load(f)


def supported_ops(path: str | None = None) -> frozenset[str]:
    table = load_table(path)
    return frozenset(name for name, entry in table["operators"].items() if entry.get("supported"))


@dataclass
class AuditResult:
    graph: str
    ops: dict[str, int]
    unsupported: dict[str, str] = field(default_factory=dict)  # op -> why
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def as_dict(self) -> dict:
        return {
            "graph": self.graph,
            "ok": self.ok,
            "ops": self.ops,
            "unsupported": self.unsupported,
            "opset": self.opset,
        }


def _walk(graph) -> Iterable[tuple[str, str]]:
    for node in graph.node:
        yield node.domain, node.op_type
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk(attr.g)
            for g in attr.graphs:
                yield from _walk(g)


def _elem_types(graph) -> dict[str, int]:
    """Tensor name -> ONNX element type, from the graph's declared and inferred value infos and initializers."""
    types = {t.name: t.type.tensor_type.elem_type for t in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:  # a Cast says its output type even where inference gave up
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                types.setdefault(node.output[0], to)
    return types


def bf16_resize_nodes(proto) -> list[str]:
    """Resize nodes whose data input is bfloat16 (the main graph; types from ONNX shape inference)."""
    import onnx

    resizes = [n for n in proto.graph.node if n.op_type == "Resize" and n.domain in ("", "ai.onnx")]
    if not resizes:
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; the declared types still count
        inferred = proto
    types = _elem_types(inferred.graph)
    bf16 = onnx.TensorProto.BFLOAT16
    return [n.name or f"Resize#{k}" for k, n in enumerate(resizes) if types.get(n.input[0]) == bf16]


def audit_model(proto, name: str = "<graph>", table_path: str | None = None) -> AuditResult:
    table = load_table(table_path)
    ops_table = table["operators"]
    lo, hi = table["source"].get("opset_range", [0, 10**6])
    counts: dict[str, int] = {}
    unsupported: dict[str, str] = {}
    for domain, op in _walk(proto.graph):
        key = op if domain in ("", "ai.onnx") else f"{domain}::{op}"
        counts[key] = counts.get(key, 0) + 1
        if domain not in ("", "ai.onnx"):
            unsupported[key] = (
                f"custom domain {domain!r}: the TensorRT parser only takes the default ONNX domain without a plugin"
            )
        elif op not in ops_table:
            unsupported[key] = "not listed in onnx-tensorrt's operators.md"
        elif not ops_table[op].get("supported"):
            unsupported[key] = "listed as unsupported in onnx-tensorrt's operators.md"
    resizes = bf16_resize_nodes(proto)
    if resizes:
        unsupported["Resize(bfloat16)"] = (
            f"TensorRT's strongly typed networks have no bf16 Resize ({len(resizes)} node(s): {', '.join(resizes[:3])}"
            f"{', ...' if len(resizes) > 3 else ''}); resize in float32 between casts"
        )
    opset = None
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset is not None and not lo <= opset <= hi:
        unsupported["<opset>"] = f"opset {opset} is outside the parser's range {lo}..{hi}"
    return AuditResult(name, dict(sorted(counts.items())), unsupported, opset)


def audit_file(path: str | os.PathLike, table_path: str | None = None) -> AuditResult:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return audit_model(proto, Path(path).stem, table_path)


def audit_files(
    paths: Iterable[str | os.PathLike], table_path: str | None = None, raise_on_error: bool = True
) -> list[AuditResult]:
    results = [audit_file(p, table_path) for p in paths]
    bad = [r for r in results if not r.ok]
    if bad and raise_on_error:
        lines = [f"{r.graph}: {op} ({why})" for r in bad for op, why in r.unsupported.items()]
        src = load_table(table_path)["source"]
        raise OpAuditError(
            f"ops outside TensorRT {src['tensorrt_version']}'s ONNX parser support:\n  " + "\n  ".join(lines)
        )
    return results


def main(argv=None) -> int:  # python -m tempomaster.export.op_audit FILE...
    import sys

    paths = list(argv if argv is not None else sys.argv[1:])
    try:
        results = audit_files(paths)
    except OpAuditError as err:
        print(err, file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.graph}: ok, {sum(r.ops.values())} nodes, {len(r.ops)} op types: {', '.join(r.ops)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
