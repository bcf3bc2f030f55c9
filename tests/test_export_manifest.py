"""Manifest verification (engines.manifest) and the build's all-or-nothing swap."""

import json
import shutil

import onnx
import pytest
from export_helpers import build, copy_build, micro_models, micro_shape

from tempomaster.build_format import manifest_text
from tempomaster.engines.manifest import (
    ManifestError,
    check_graph_io,
    check_request,
    load_manifest,
    ort_session_io,
    verify_build,
    verify_files,
)
from tempomaster.errors import UsageError


@pytest.fixture()
def build_copy(tmp_path):
    return copy_build(build("fp32"), tmp_path / "build")


def test_clean_build_verifies(build_copy):
    m = verify_build(
        build_copy,
        request={
            "preset": "micro",
            "precision": "fp32",
            "height": 32,
            "width": 48,
            "num_frames": 9,
            "intervals": [4, 2, 1],
        },
    )
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
    (build_copy / "manifest.json").write_text(manifest_text(m.data))
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
    for part in (
        "preset: build 'micro', asked 'tiny'",
        "precision: build 'fp32', asked 'fp16'",
        "height: build 32, asked 64",
        "DiT latent frames",
    ):
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
    before = {p.name: p.read_bytes() for p in sorted((out / "onnx").iterdir())} | {
        "m": (out / "manifest.json").read_bytes()
    }
    real = onnx_utils.export_graph

    def failing(spec, *a, **k):
        if spec.name == "dit":
            raise onnx_utils.ExportError("dit: simulated failure")
        return real(spec, *a, **k)

    monkeypatch.setattr(build_mod, "export_graph", failing)
    with pytest.raises(onnx_utils.ExportError, match="simulated"):
        build_mod.export_onnx(micro_models(), "fp32", micro_shape(), out, graphs=["t5", "dit"], progress=False)
    after = {p.name: p.read_bytes() for p in sorted((out / "onnx").iterdir())} | {
        "m": (out / "manifest.json").read_bytes()
    }
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


# ----------------------------------------------------------------------------
# Nothing outside the build folder: paths, links, the manifest's own checksum
# ----------------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A file elsewhere on the machine, of a random size no message may reveal."""
    import os

    import numpy as np

    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(os.urandom(int(np.random.default_rng().integers(1000, 90000))))
    return path


@pytest.fixture
def watch_outside(monkeypatch, outside):
    """Every stat, lstat and open of the outside file, recorded."""
    import builtins
    import os

    touched = []
    secret = str(outside)

    def spy(real):
        def call(path, *a, **k):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith("secret.bin"):
                touched.append((real.__name__, os.fspath(path)))
            return real(path, *a, **k)

        return call

    for name in ("stat", "lstat", "open"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    assert secret  # the fixture is about this file
    return touched


def _reseal(build_dir, edit) -> None:
    """Edit the manifest and seal it again, as someone crafting a build would."""
    path = build_dir / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(manifest_text(data))


def _point_dit_at(data, rel, size=1):
    data["graphs"]["dit"]["file"] = rel
    data["files"][rel] = {"sha256": "0" * 64, "bytes": size}


@pytest.mark.parametrize(
    "how, field",
    [
        ("dotdot", "graphs.dit.file"),
        ("absolute", "graphs.dit.file"),
        ("files-only", "files["),
        ("external-data", "graphs.dit.external_data"),
        ("plan", "engines.plans.dit.file"),
        ("calibration", "fp8.calibration.file"),
    ],
)
def test_a_manifest_path_out_of_the_build_is_refused_without_looking_at_it(
    how, field, build_copy, outside, watch_outside
):
    import os

    size = len(outside.read_bytes())
    watch_outside.clear()
    rel_up = os.path.relpath(outside, build_copy)  # ../elsewhere/secret.bin
    edits = {
        "dotdot": lambda d: _point_dit_at(d, rel_up),
        "absolute": lambda d: _point_dit_at(d, str(outside)),
        "files-only": lambda d: d["files"].update({rel_up: {"sha256": "0" * 64, "bytes": 1}}),
        "external-data": lambda d: (
            d["graphs"]["dit"].update(external_data=rel_up),
            d["files"].update({rel_up: {"sha256": "0" * 64, "bytes": 1}}),
        ),
        "plan": lambda d: d.update(engines={"plans": {"dit": {"file": str(outside), "sha256": "0" * 64, "bytes": 1}}}),
        "calibration": lambda d: d.update(fp8={"calibration": {"file": rel_up}}),
    }
    _reseal(build_copy, edits[how])
    with pytest.raises(ManifestError) as err:
        verify_files(load_manifest(build_copy))
    msg = str(err.value)
    assert field in msg and "refusing the build" in msg
    assert str(size) not in msg.replace(str(outside), "")
    assert watch_outside == []


@pytest.mark.parametrize("link", ["absolute", "relative", "folder"])
def test_a_link_out_of_the_build_is_refused_even_when_its_bytes_match(link, build_copy, tmp_path, watch_outside):
    """A graph swapped for a link to an identical copy elsewhere: the hash alone would accept it."""
    import os

    elsewhere = tmp_path / "elsewhere"
    if link == "folder":
        shutil.copytree(build_copy / "onnx", elsewhere / "onnx")
        shutil.rmtree(build_copy / "onnx")
        (build_copy / "onnx").symlink_to(elsewhere / "onnx")
    else:
        shutil.copy(build_copy / "onnx" / "t5.onnx", elsewhere / "t5.onnx")
        (build_copy / "onnx" / "t5.onnx").unlink()
        target = (
            elsewhere / "t5.onnx" if link == "absolute" else os.path.relpath(elsewhere / "t5.onnx", build_copy / "onnx")
        )
        (build_copy / "onnx" / "t5.onnx").symlink_to(target)
    with pytest.raises(ManifestError, match="symbolic link") as err:
        verify_files(load_manifest(build_copy))
    assert ("onnx/t5.onnx" if link != "folder" else "'onnx/") in str(err.value)
    assert not [t for t in watch_outside if "elsewhere" in t[1]]


def test_a_link_that_stays_inside_the_build_is_followed(build_copy):
    real = build_copy / "onnx" / "t5-v1.onnx"
    (build_copy / "onnx" / "t5.onnx").rename(real)
    (build_copy / "onnx" / "t5.onnx").symlink_to("t5-v1.onnx")
    (build_copy / "graphs").symlink_to("onnx", target_is_directory=True)
    _reseal(
        build_copy,
        lambda d: (
            d["graphs"]["vae_decoder"].update(file="graphs/vae_decoder.onnx")
            or d["files"].update({"graphs/vae_decoder.onnx": d["files"]["onnx/vae_decoder.onnx"]})
        ),
    )
    verify_files(load_manifest(build_copy))


def test_manifest_json_linked_from_elsewhere_is_not_read(build_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(build_copy / "manifest.json", elsewhere)
    (build_copy / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="symbolic link"):
        load_manifest(build_copy)


def test_an_edited_manifest_is_refused_and_an_older_one_still_reads(build_copy):
    path = build_copy / "manifest.json"
    sealed = json.loads(path.read_text())
    assert sealed["manifest_sha256"]
    for edit in (
        lambda d: d["shape"].update(num_frames=d["shape"]["num_frames"] + 4),
        lambda d: d["graphs"]["dit"].update(max_batch=d["graphs"]["dit"]["max_batch"] + 1),
        lambda d: d.update(note="hand-edited"),
    ):
        data = json.loads(json.dumps(sealed))
        edit(data)
        path.write_text(json.dumps(data, indent=1))
        with pytest.raises(ManifestError, match="edited after tm-export wrote it"):
            load_manifest(build_copy)
    # reformatted but not changed: the checksum is over the content, not the layout
    path.write_text(json.dumps(sealed, indent=4, sort_keys=True))
    verify_files(load_manifest(build_copy))
    # written before manifests carried a checksum: read, with every other check
    older = {k: v for k, v in sealed.items() if k != "manifest_sha256"}
    path.write_text(json.dumps(older, indent=1))
    verify_files(load_manifest(build_copy))
    older["graphs"]["t5"]["file"] = "../t5.onnx"
    path.write_text(json.dumps(older, indent=1))
    with pytest.raises(ManifestError, match="graphs.t5.file"):
        load_manifest(build_copy)
