"""`tm-export build` on a machine without TensorRT or a GPU: the ONNX step completes, then exit code 3.

These tests need a machine that lacks TensorRT or a CUDA GPU (they check the
refusal); on a GPU machine with TensorRT, tests/test_gpu_tensorrt.py runs instead.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tempomaster.build_format import manifest_text
from tempomaster.calibration.export import FP8Options
from tempomaster.engines.build import (
    ENGINE_REQUEST_KEY,
    check_engine_precision,
    resume_build,
)
from tempomaster.engines.builder import EngineOptions, build_engines, parse_size
from tempomaster.engines.manifest import load_manifest, verify_files
from tempomaster.engines.trt_env import cuda_available, tensorrt_available
from tempomaster.errors import ManifestError, MissingDependencyError, UsageError
from tempomaster.export.source import ExportSource
from tempomaster.toolchain import export_and_build

pytestmark = pytest.mark.skipif(
    cuda_available() and tensorrt_available(), reason="this machine has TensorRT and a GPU: nothing is missing"
)

OPTIONS = EngineOptions(
    opt_level=4,
    workspace=6 * 2**30,
    weight_streaming=True,
    hardware_compat="ampere+",
    version_compatible=True,
    strip_weights=True,
)


def _check_exit_3(err: MissingDependencyError, build) -> None:
    msg = str(err)
    assert err.exit_code == 3
    assert "\n" not in msg
    assert "TensorRT" in msg or "GPU" in msg
    assert f"tm-export build --resume {build}" in msg


def test_build_exports_the_onnx_then_stops_with_exit_3(tmp_path):
    out = tmp_path / "tiny-t5"
    lines = []
    with pytest.raises(MissingDependencyError) as info:
        export_and_build(
            out,
            ExportSource(preset="tiny", height=32, width=48, num_frames=9, intervals=(4, 2, 1), graphs=["t5"]),
            precision="fp16",
            options=OPTIONS,
            progress=False,
            log=lines.append,
        )
    _check_exit_3(info.value, out)
    # the ONNX step is complete and intact, and remembers the engine options for --resume
    manifest = load_manifest(out)
    verify_files(manifest)
    assert manifest.graphs["t5"]["precision"] == "bf16"  # umT5 is never fp16
    assert (out / "onnx" / "t5.onnx").is_file()
    assert EngineOptions.from_dict(manifest.data[ENGINE_REQUEST_KEY]) == OPTIONS
    assert not (out / "engines").exists() or not any((out / "engines").glob("*.plan"))
    assert any("ONNX" in line for line in lines)


def test_resume_checks_the_onnx_then_stops_with_exit_3(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "b")
    with pytest.raises(MissingDependencyError) as info:
        resume_build(build, log=lambda _l: None)
    _check_exit_3(info.value, build)
    # engine flags given with --resume are checked before the engine step too
    with pytest.raises(UsageError, match="--opt-level"):
        resume_build(build, overrides={"opt_level": 9}, log=lambda _l: None)
    with pytest.raises(UsageError, match="unknown engine options"):
        resume_build(build, overrides={"fp16": True}, log=lambda _l: None)


def _edit_manifest(build, edit) -> None:
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(manifest_text(data))  # sealed: as a tool of another version might have written it


def test_resume_names_the_manifest_field_not_a_flag_never_given(tiny_build, tmp_path, capsys):
    from tempomaster.cli import export_main

    build = shutil.copytree(tiny_build, tmp_path / "b")
    _edit_manifest(build, lambda d: d.update(precision="int4"))
    with pytest.raises(ManifestError) as info:
        resume_build(build, log=lambda _l: None)
    assert f"{build / 'manifest.json'}: precision 'int4'" in str(info.value) and "--precision" not in str(info.value)

    _edit_manifest(
        build, lambda d: d.update(precision="fp32", **{ENGINE_REQUEST_KEY: {"opt_level": 9, "hardware_compat": "all"}})
    )
    assert export_main(["build", "--resume", str(build)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{ENGINE_REQUEST_KEY}.opt_level must be an integer 0..5" in err and "--opt-level" not in err
    # a flag given with --resume replaces the recorded value: then the other recorded field is the one named
    with pytest.raises(ManifestError, match=f"{ENGINE_REQUEST_KEY}.hardware_compat must be one of"):
        resume_build(build, overrides={"opt_level": 2}, log=lambda _l: None)
    with pytest.raises(MissingDependencyError):
        resume_build(build, overrides={"opt_level": 2, "hardware_compat": "none"}, log=lambda _l: None)
    _edit_manifest(build, lambda d: d.update(**{ENGINE_REQUEST_KEY: [3]}))
    with pytest.raises(ManifestError, match=f"{ENGINE_REQUEST_KEY} must be an object, got list"):
        resume_build(build, log=lambda _l: None)


def test_resume_refuses_a_tampered_onnx(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "b")
    path = build / "onnx" / "vae_decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit changed
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        resume_build(build, log=lambda _l: None)
    assert "onnx/vae_decoder.onnx" in str(info.value) and "modified" in str(info.value)
    with pytest.raises(ManifestError, match="vae_decoder.onnx"):
        build_engines(build, log=lambda _l: None)


def test_resume_refuses_a_missing_onnx(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "b")
    (build / "onnx" / "t5.onnx").unlink()
    with pytest.raises(ManifestError, match="onnx/t5.onnx: missing"):
        resume_build(build, log=lambda _l: None)


def test_precision_switch():
    with pytest.raises(UsageError, match="--precision must be one of"):
        check_engine_precision("int8")
    assert check_engine_precision("bf16") == "bf16" and check_engine_precision("fp8") == "fp8"


def test_fp8_build_calibrates_exports_then_stops_with_exit_3(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball bouncing\n# a comment\na blue square sliding left\n")
    out = tmp_path / "fp8"
    with pytest.raises(MissingDependencyError) as info:
        export_and_build(
            out,
            ExportSource(preset="tiny", height=32, width=48, num_frames=5, intervals=(4, 2, 1), graphs=["dit"]),
            precision="fp8",
            progress=False,
            log=lambda _l: None,
            fp8=FP8Options(prompts=prompts, calib_steps=(1, 1, 1), report_prompts=0),
        )
    _check_exit_3(info.value, out)
    manifest = load_manifest(out)
    verify_files(manifest)  # the calibration files are part of the build, hashed
    assert manifest.precision == "fp8" and manifest.data["fp8"]["quantized_layers"] == 2 * 10
    assert "calibration/amax.json" in manifest.data["files"]
    # resume: the same ONNX, hash-checked, then the same stop
    with pytest.raises(MissingDependencyError):
        resume_build(out, log=lambda _l: None)


def test_engine_option_checks():
    with pytest.raises(UsageError, match="--opt-level"):
        EngineOptions(opt_level=6).validate()
    with pytest.raises(UsageError, match="--hardware-compat"):
        EngineOptions(hardware_compat="turing+").validate()
    with pytest.raises(UsageError, match="--workspace"):
        EngineOptions(workspace=0).validate()
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5G") == 3 * 2**29
    assert parse_size("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(UsageError, match="--workspace"):
            parse_size(bad)


@pytest.mark.slow
def test_full_tiny_build_stops_at_the_engine_step(tmp_path):
    """All six graphs of the tiny preset (about 90 s on 2 cores), then exit 3 with the ONNX complete."""
    out = tmp_path / "tiny"
    with pytest.raises(MissingDependencyError) as info:
        export_and_build(out, ExportSource(preset="tiny"), precision="bf16", progress=False, log=lambda _l: None)
    _check_exit_3(info.value, out)
    manifest = load_manifest(out)
    verify_files(manifest)
    assert sorted(manifest.graphs) == sorted(
        ["dit", "t5", "vae_encoder_first", "vae_encoder", "vae_decoder_first", "vae_decoder"]
    )
    assert (out / "tokenizer").is_dir()


# ---------------------------------------------------------------- the command line
def test_cli_build_stops_with_exit_3_and_says_how_to_finish(tmp_path, capsys):
    from tempomaster.cli import export_main

    out = tmp_path / "b"
    rc = export_main(
        [
            "build",
            "--precision",
            "fp16",
            "--graphs",
            "t5",
            "--num-frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--workspace",
            "1GiB",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert err[-1].startswith("tm-export: error: ") and f"tm-export build --resume {out}" in err[-1]
    assert "Traceback" not in "\n".join(err)
    verify_files(load_manifest(out))
    assert load_manifest(out).data[ENGINE_REQUEST_KEY]["workspace"] == 2**30


def test_cli_resume_refuses_a_tampered_onnx_and_source_flags(tiny_build, tmp_path, capsys):
    from tempomaster.cli import export_main

    build = shutil.copytree(tiny_build, tmp_path / "b")
    assert export_main(["build", "--resume", str(build), "--preset", "tiny"]) == 2
    assert "--resume reuses BUILD as exported: do not give --preset" in capsys.readouterr().err
    with open(build / "onnx" / "dit.onnx", "ab") as fh:
        fh.write(b"\0")
    assert export_main(["build", "--resume", str(build)]) == 2
    err = capsys.readouterr().err
    assert "onnx/dit.onnx" in err and "modified" in err


def test_cli_fp8_refusals_and_missing_out(tmp_path, capsys):
    from tempomaster.cli import export_main

    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n")
    small = ["--num-frames", "5", "--height", "32", "--width", "48", "--no-progress"]
    cases = [
        (
            ["build", "--precision", "fp8", "--calib-prompts", str(empty), "--out", str(tmp_path / "b"), *small],
            "no prompt",
        ),
        (["build", "--precision", "fp8", "--no-calibrate", "--out", str(tmp_path / "b"), *small], "--no-calibrate"),
        (["onnx", "--fp8-skip-blocks", "0", "--out", str(tmp_path / "b"), *small], "only with --precision fp8"),
        (["build", "--precision", "fp8", "--fp8-twin", "--out", str(tmp_path / "b"), *small], "--fp8-twin"),
        (["build", "--precision", "fp8", "--random-weights", "--out", str(tmp_path / "b"), *small], "--random-weights"),
        (["onnx", "--precision", "fp8", "--tile", "--out", str(tmp_path / "b"), *small], "--tile with --precision fp8"),
    ]
    for args, needle in cases:
        assert export_main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert needle in err and "Traceback" not in err, (args, err)
        assert err.count("error:") == 1, err
    assert not (tmp_path / "b").exists()
    assert export_main(["build"]) == 2
    assert "--out: required" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # nothing written


def test_cli_backend_choice(tiny_build, tmp_path, capsys):
    from tempomaster.cli import run_main

    rc = run_main(["generate", "--prompt", "x", "--backend", "onnxruntime", "--out", str(tmp_path / "v.mp4")])
    assert rc == 2 and "give --engines BUILD" in capsys.readouterr().err
    rc = run_main(
        ["generate", "--prompt", "x", "--engines", str(tiny_build), "--cuda-graphs", "--out", str(tmp_path / "v.mp4")]
    )
    assert rc == 2 and "--cuda-graphs needs the tensorrt backend" in capsys.readouterr().err
    rc = run_main(
        [
            "generate",
            "--prompt",
            "x",
            "--engines",
            str(tiny_build),
            "--backend",
            "tensorrt",
            "--out",
            str(tmp_path / "v.mp4"),
        ]
    )
    assert rc in (2, 3) and "Traceback" not in capsys.readouterr().err  # no plans / no TensorRT here
    assert not list(tmp_path.iterdir())
