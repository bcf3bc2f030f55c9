"""Manifest verification (engines.manifest) and the build's all-or-nothing swap."""
import json

import onnx
import pytest

from export_helpers import build, copy_build, micro_models, micro_shape

from tempomaster.errors import UsageError
from tempomaster.engines.manifest import (
    ManifestError,
    check_graph_io,
    check_request,
    load_manifest,
    ort_session_io,
    verify_build,
    verify_files,
)


@pytest.fixture()
def build_copy(tmp_path):
    return copy_build(build("fp32"), tmp_path / "build")


def test_clean_build_verifies(build_copy):
    m = verify_build(build_copy, request={"preset": "micro", "precision": "fp32", "height": 32, "width": 48,
                                         "num_frames": 9, "intervals": [4, 2, 1]})
    assert m.max_batch("dit") >= 1 and m.path("t5").is_file()


def test_tampered_file_is_named(build_copy):
    target = build_copy / "onnx" / "vae_decoder.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"onnx/vae_decoder\.onnx: sha256 .*modified") as err:
        verify_files(load_manifest(build_copy))
    assert "dit.onnx" not in str(err.value)
    (build_copy / "onnx" / "t5.onnx").unlink()
    with pytest.raises(ManifestError, match=r"onnx/t5\.onnx: missing"):
        verify_files(load_manifest(build_copy))


def test_renamed_input_is_detected(build_copy):
    path = build_copy / "onnx" / "dit.onnx"
    proto = onnx.load(str(path))
    old = proto.graph.input[3].name
    assert old == "context"
    proto.graph.input[3].name = "text"
    for node in proto.graph.node:
        node.input[:] = ["text" if i == old else i for i in node.input]
    onnx.save(proto, str(path))
    # even with the hash brought up to date, the graph's inputs give it away
    m = load_manifest(build_copy)
    from tempomaster.engines.manifest import sha256_file

    m.data["files"]["onnx/dit.onnx"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    (build_copy / "manifest.json").write_text(json.dumps(m.data))
    with pytest.raises(ManifestError) as err:
        verify_build(build_copy)
    msg = str(err.value)
    assert "input 'context': in the manifest, not in the graph" in msg
    assert "input 'text': in the graph, not in the manifest" in msg


def test_session_io_check(build_copy):
    import onnxruntime as ort

    m = load_manifest(build_copy)
    s = ort.InferenceSession(str(m.path("t5")), providers=["CPUExecutionProvider"])
    ins, outs = ort_session_io(s)
    check_graph_io(m, "t5", ins, outs)
    with pytest.raises(ManifestError, match="input 'ids': dtype int32, manifest says int64"):
        check_graph_io(m, "t5", [("ids", "int32", ["batch", 512]), ins[1]], outs)
    with pytest.raises(ManifestError, match=r"input 'mask': shape \['batch', 256\]"):
        check_graph_io(m, "t5", [ins[0], ("mask", "int64", ["batch", 256])], outs)


def test_request_mismatch_says_what_differs(build_copy):
    m = load_manifest(build_copy)
    check_request(m, num_frames=7, intervals=[4, 2, 1])  # rounds to 9: same 3 latent frames
    with pytest.raises(ManifestError) as err:
        check_request(m, preset="tiny", precision="fp16", height=64, width=48, num_frames=17)
    msg = str(err.value)
    for part in ("preset: build 'micro', asked 'tiny'", "precision: build 'fp32', asked 'fp16'",
                 "height: build 32, asked 64", "DiT latent frames"):
        assert part in msg
    assert "width" not in msg


def test_not_a_build(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path)


def test_failed_export_leaves_previous_build(tmp_path, monkeypatch):
    from tempomaster.export import build as build_mod
    from tempomaster.export import onnx_utils

    out = tmp_path / "b"
    build_mod.export_onnx(micro_models(), "fp32", micro_shape(), out, graphs=["t5"], progress=False)
    before = {p.name: p.read_bytes() for p in sorted((out / "onnx").iterdir())} | {"m": (out / "manifest.json").read_bytes()}
    real = onnx_utils.export_graph

    def failing(spec, *a, **k):
        if spec.name == "dit":
            raise onnx_utils.ExportError("dit: simulated failure")
        return real(spec, *a, **k)

    monkeypatch.setattr(build_mod, "export_graph", failing)
    with pytest.raises(onnx_utils.ExportError, match="simulated"):
        build_mod.export_onnx(micro_models(), "fp32", micro_shape(), out, graphs=["t5", "dit"], progress=False)
    after = {p.name: p.read_bytes() for p in sorted((out / "onnx").iterdir())} | {"m": (out / "manifest.json").read_bytes()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging left behind
    # a directory that is not a build is never replaced
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="refusing"):
        build_mod.export_onnx(micro_models(), "fp32", micro_shape(), tmp_path / "keep", graphs=["t5"], progress=False)


def test_cli_export_tiny_t5(tmp_path, capsys):
    from tempomaster.cli import export_main

    out = tmp_path / "tiny-build"
    assert export_main(["onnx", "--preset", "tiny", "--precision", "fp16", "--graphs", "t5", "--out", str(out)]) == 0
    m = verify_build(out)
    assert m.preset == "tiny" and m.precision == "fp16"
    assert m.graph("t5")["precision"] == "bf16"  # umT5 is never fp16
    assert m.shape["height"] == 64 and m.shape["width"] == 96 and m.shape["num_frames"] == 17  # preset defaults
    assert "op audit" in capsys.readouterr().out
    assert export_main(["onnx", "--preset", "tiny", "--graphs", "nope", "--out", str(tmp_path / "x")]) == 2
