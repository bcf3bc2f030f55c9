"""Op audit: every node of an exported graph must be one TensorRT's ONNX parser supports.

The supported set is data (`trt_parser_ops.json`), transcribed from
onnx-tensorrt's docs/operators.md for TensorRT 10.15 (the file records where
it came from). An op is accepted when the table lists it as supported and it
is in the default ONNX domain; custom-domain ops (com.microsoft, ...) and
anything the table marks unsupported or does not list are failures. Ops inside
subgraphs (If/Loop bodies) are audited too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable

TABLE_FILE = Path(__file__).with_name("trt_parser_ops.json")


from ..errors import OpAuditError  # noqa: E402


@lru_cache(maxsize=None)
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
        return {"graph": self.graph, "ok": self.ok, "ops": self.ops, "unsupported": self.unsupported, "opset": self.opset}


def _walk(graph) -> Iterable[tuple[str, str]]:
    for node in graph.node:
        yield node.domain, node.op_type
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _walk(attr.g)
            for g in attr.graphs:
                yield from _walk(g)


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
            unsupported[key] = f"custom domain {domain!r}: the TensorRT parser only takes the default ONNX domain without a plugin"
        elif op not in ops_table:
            unsupported[key] = "not listed in onnx-tensorrt's operators.md"
        elif not ops_table[op].get("supported"):
            unsupported[key] = "listed as unsupported in onnx-tensorrt's operators.md"
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


def audit_files(paths: Iterable[str | os.PathLike], table_path: str | None = None, raise_on_error: bool = True) -> list[AuditResult]:
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
