"""Every bad input is one line and exit code 2 before any model loads; Ctrl-C is one line and 130; files take the umask."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tempomaster.build_format import manifest_text
from tempomaster.cli import run_main

BIN = Path(sys.executable).parent


def _exit_code(main, args) -> int:
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture
def no_models(monkeypatch):
    import tempomaster.runtime.jobs as jobs

    monkeypatch.setattr(jobs, "make_backend", lambda *a: pytest.fail("a model was loaded"))


def _refused(capsys, args, needle, workdir: Path) -> str:
    before = sorted(workdir.rglob("*"))
    assert _exit_code(run_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    assert sorted(workdir.rglob("*")) == before  # nothing written
    return err


@pytest.fixture
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------
# --out, --seed, numbers, images, prompt
# ----------------------------------------------------------------------------


def test_out_that_cannot_be_created(tmp_path, capsys, no_models):
    _refused(capsys, ["generate", "--prompt", "x", "--out", "/proc/tm-run-test/video.mp4"], "--out", tmp_path)
    _refused(capsys, ["generate", "--prompt", "x", "--out", "/proc/tm-run-test/frames"], "--out", tmp_path)


def test_mp4_path_that_is_a_directory(tmp_path, capsys, no_models):
    (tmp_path / "v.mp4").mkdir()
    err = _refused(capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "v.mp4")], "--out", tmp_path)
    assert "is an existing directory" in err


@pytest.mark.parametrize("seed", [str(2**64), "-1", "1e3"])
def test_seed_outside_torchs_range(seed, tmp_path, capsys, no_models):
    _refused(
        capsys, ["generate", "--prompt", "x", f"--seed={seed}", "--out", str(tmp_path / "v.mp4")], "--seed", tmp_path
    )


def test_largest_seed_is_accepted(tmp_path):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    jobs = build_jobs(GenerateOptions(prompt="x", seed=2**64 - 1), get_preset("tiny").defaults)
    assert jobs[0].request.seed == 2**64 - 1


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--guidance", "nan"),
        ("--guidance", "inf"),
        ("--guidance", "0"),
        ("--guidance", "-2"),
        ("--save-fps", "nan"),
        ("--save-fps", "-inf"),
        ("--save-fps", "0"),
        ("--save-fps", "5000"),
        ("--shifts", "5,nan,3"),
    ],
)
def test_numbers_out_of_range(flag, value, tmp_path, capsys, no_models):
    _refused(capsys, ["generate", "--prompt", "x", f"{flag}={value}", "--out", str(tmp_path / "v.mp4")], flag, tmp_path)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("cfg_scale", "8", "inference_configs.cfg_scale"),
        ("save_fps", "24", "inference_configs.save_fps"),
        ("use_apg", "false", "inference_configs.use_apg"),
        ("num_frames", 17.5, "inference_configs.num_frames"),
        ("cfg_scale", None, None),
    ],
)
def test_release_config_values_of_the_wrong_type(key, value, needle, tmp_path, capsys, no_models):
    config = {"inference_configs": {"height": 64, "width": 96, "num_frames": 17, "cfg_scale": 8, "use_apg": True}}
    if needle is None:  # a NaN cfg_scale, as Python's json writes it
        text = json.dumps(config).replace('"cfg_scale": 8', '"cfg_scale": NaN')
        needle = "inference_configs.cfg_scale"
    else:
        config["inference_configs"][key] = value
        text = json.dumps(config)
    path = tmp_path / "cfg.json"
    path.write_text(text)
    err = _refused(
        capsys,
        ["generate", "--prompt", "x", "--preset", "tiny", "--config", str(path), "--out", str(tmp_path / "v.mp4")],
        needle,
        tmp_path,
    )
    assert "--config" in err


def test_parallel_config_lists_must_hold_numbers(tmp_path, capsys, no_models):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"inference_configs": {"parallel_configs": {"steps_per_stage": ["50", 32, 32]}}}))
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--preset", "tiny", "--config", str(path), "--out", str(tmp_path / "v.mp4")],
        "parallel_configs.steps_per_stage",
        tmp_path,
    )


@pytest.mark.parametrize("image", ["²:a.png", "٣:a.png", "0x1:a.png", ":a.png", "3:"])
def test_image_frame_that_is_not_an_integer(image, tmp_path, capsys, no_models):
    _refused(
        capsys, ["generate", "--prompt", "x", f"--image={image}", "--out", str(tmp_path / "v.mp4")], "--image", tmp_path
    )


def test_negative_image_index_counts_from_the_end(png):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    # 17 frames: -1 is frame 16, -17 is frame 0
    jobs = build_jobs(GenerateOptions(prompt="x", images=[f"-1:{png}", f"-17:{png}"]), get_preset("tiny").defaults)
    assert sorted(jobs[0].request.ref_images) == [0, 16]


def test_negative_image_index_past_the_start(png, tmp_path, capsys, no_models):
    err = _refused(
        capsys,
        ["generate", "--prompt", "x", f"--image=-18:{png}", "--out", str(tmp_path / "v.mp4")],
        "--image",
        tmp_path,
    )
    assert "-17..16" in err


def test_same_frame_twice(png, tmp_path, capsys, no_models):
    _refused(
        capsys,
        ["generate", "--prompt", "x", f"--image=0:{png}", f"--image=-17:{png}", "--out", str(tmp_path / "v.mp4")],
        "given twice",
        tmp_path,
    )


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_names_the_flag(prompt, tmp_path, capsys, no_models):
    err = _refused(capsys, ["generate", "--prompt", prompt, "--out", str(tmp_path / "v.mp4")], "--prompt", tmp_path)
    assert "--config" not in err.split(":")[1]


def test_flag_errors_answer_before_torch_is_imported():
    code = (
        "import sys\nfrom tempomaster.cli import run_main\n"
        "try:\n    run_main(['generate', '--guidance', 'nan'])\nexcept SystemExit as e:\n    assert e.code == 2\n"
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_every_flag_has_help():
    from tempomaster.cli.export import build_parser as export_parser
    from tempomaster.cli.run import build_parser as run_parser

    for parser in (export_parser(), run_parser()):
        for sub in parser._subparsers._group_actions[0].choices.values():
            for action in sub._actions:
                if action.option_strings and action.dest != "help":
                    assert action.help, f"{sub.prog} {action.option_strings} has no help text"


# ----------------------------------------------------------------------------
# Build integrity (--engines)
# ----------------------------------------------------------------------------


def _tamper_manifest(build: Path, edit) -> None:
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    data = edit(data)
    # sealed as tm-export seals it: the checks below must hold even for a manifest regenerated by hand
    path.write_text(manifest_text(data) if isinstance(data, dict) else json.dumps(data))


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: [1, 2, 3], "must hold a JSON object"),
        (lambda d: {k: v for k, v in d.items() if k != "models"}, "missing models"),
        (lambda d: {k: v for k, v in d.items() if k != "shape"}, "missing shape"),
        (lambda d: {**d, "preset": "giant"}, "unknown preset 'giant'"),
        (
            lambda d: {
                **d,
                "graphs": {**d["graphs"], "dit": {k: v for k, v in d["graphs"]["dit"].items() if k != "max_batch"}},
            },
            "graph 'dit' lacks max_batch",
        ),
        (
            lambda d: {**d, "files": {k: v for k, v in d["files"].items() if k != "onnx/dit.onnx"}},
            "names onnx/dit.onnx, which has no sha256",
        ),
        (
            lambda d: {**d, "models": {**d["models"], "dit": {}}},
            "models.dit.dim must be a positive integer, got nothing",
        ),
        (
            lambda d: {**d, "models": {**d["models"], "t5": {**d["models"]["t5"], "text_len": "512"}}},
            "models.t5.text_len must be a positive integer, got '512'",
        ),
        (
            lambda d: {**d, "models": {**d["models"], "dit": {**d["models"]["dit"], "patch_size": [1, 2]}}},
            "models.dit.patch_size must be a list of 3 positive integers",
        ),
        (lambda d: {**d, "shape": {**d["shape"], "num_frames": 9.5}}, "shape.num_frames must be a positive integer"),
        (
            lambda d: {
                **d,
                "graphs": {**d["graphs"], "t5": {**d["graphs"]["t5"], "file": "../../t5.onnx"}},
                "files": {**d["files"], "../../t5.onnx": d["files"]["onnx/t5.onnx"]},
            },
            "graphs.t5.file: '../../t5.onnx' climbs out with '..'",
        ),
    ],
)
def test_a_broken_manifest_is_one_line(edit, needle, tiny_build, tmp_path, capsys, no_models):
    build = shutil.copytree(tiny_build, tmp_path / "b")
    _tamper_manifest(build, edit)
    out = tmp_path / "out"
    out.mkdir()
    _refused(capsys, ["generate", "--prompt", "x", "--engines", str(build), "--out", str(out / "v.mp4")], needle, out)


def test_a_hand_edited_manifest_is_one_line(tiny_build, tmp_path, capsys, no_models):
    build = shutil.copytree(tiny_build, tmp_path / "b")
    path = build / "manifest.json"
    data = json.loads(path.read_text())
    data["shape"]["num_frames"] = 13
    path.write_text(json.dumps(data, indent=1))  # edited, not re-exported
    out = tmp_path / "out"
    out.mkdir()
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--engines", str(build), "--out", str(out / "v.mp4")],
        f"{path}: edited after tm-export wrote it",
        out,
    )


def test_a_graph_modified_after_its_hash_was_dropped_is_refused(tiny_build, tmp_path):
    from tempomaster.errors import ManifestError
    from tempomaster.runtime.backends.onnxruntime import OnnxRuntimeBackend

    build = shutil.copytree(tiny_build, tmp_path / "b")
    with open(build / "onnx" / "dit.onnx", "ab") as fh:
        fh.write(b"\0")
    _tamper_manifest(build, lambda d: {**d, "files": {k: v for k, v in d["files"].items() if k != "onnx/dit.onnx"}})
    with pytest.raises(ManifestError, match="no sha256"):
        OnnxRuntimeBackend.from_build(build)


# ----------------------------------------------------------------------------
# Interruption and file modes
# ----------------------------------------------------------------------------


def _interrupt(args: list[str], wait_for, workdir: Path, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """Start a CLI, send SIGINT once `wait_for()` holds, collect the result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs with SIGINT ignored, and an ignored signal survives exec:
    # the CLI would rightly not hear Ctrl+C. Give the child the default disposition a terminal gives.
    proc = subprocess.Popen(
        args,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout
    while not wait_for() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_ctrl_c_during_generation(tmp_path):
    out = tmp_path / "v.mp4"
    # the progress bar's first stage line appears once generation is under way
    log = tmp_path / "started"
    args = [
        str(BIN / "tm-run"),
        "generate",
        "--prompt",
        "x",
        "--num-frames",
        "33",
        "--threads",
        "1",
        "--steps",
        "50,50,50",
        "--out",
        str(out),
    ]
    proc_args = ["bash", "-c", f'exec "$@" 2> >(tee {log} >&2)', "_", *args]
    res = _interrupt(proc_args, lambda: log.exists() and "stage 0" in log.read_text(errors="ignore"), tmp_path)
    assert res.returncode == 130, res.stderr[-2000:]
    last = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last == "tm-run: interrupted; nothing half-written was kept"
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]


def test_ctrl_c_during_export(tmp_path):
    out = tmp_path / "build"
    args = [str(BIN / "tm-export"), "onnx", "--out", str(out), "--num-frames", "9", "--height", "32", "--width", "48"]
    staging = lambda: any(p.name.startswith(".build.tmp-") for p in tmp_path.iterdir())  # noqa: E731
    res = _interrupt(args, staging, tmp_path)
    assert res.returncode == 130, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "tm-export: interrupted; nothing half-written was kept"
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_outputs_take_the_umask(tmp_path):
    import torch

    from tempomaster.runtime.video import to_uint8_frames, write_mp4, write_png_frames

    frames = to_uint8_frames(torch.rand(3, 3, 16, 16) * 2 - 1)
    old = os.umask(0o022)
    try:
        mp4 = write_mp4(frames, tmp_path / "v.mp4", 24)
        folder = write_png_frames(frames, tmp_path / "frames")
    finally:
        os.umask(old)
    assert stat.S_IMODE(mp4.stat().st_mode) == 0o644
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_missing_onnxruntime_says_how_to_install_it_from_a_clone(tiny_build, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    rc = run_main(
        ["generate", "--prompt", "x", "--engines", str(tiny_build), "--out", str(tmp_path / "v.mp4"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 3 and len(err.splitlines()) == 1
    assert "pip install -e '.[ort]'" in err
    assert not list(tmp_path.iterdir())


def test_tile_comes_from_the_flag_else_the_release_config(tmp_path, capsys, no_models):
    from tempomaster.models.presets import get_preset
    from tempomaster.runtime.request import GenerateOptions, build_jobs

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"inference_configs": {"tile": True}}))
    defaults = get_preset("tiny").defaults
    for flag, expected in ((None, True), (False, False), (True, True)):
        options = GenerateOptions(prompt="x", config=path, tile=flag)
        build_jobs(options, defaults)
        assert options.tile is expected
    options = GenerateOptions(prompt="x")
    build_jobs(options, defaults)
    assert not options.tile
    path.write_text(json.dumps({"inference_configs": {"tile": "true"}}))
    out = tmp_path / "out"
    out.mkdir()
    _refused(
        capsys,
        ["generate", "--prompt", "x", "--preset", "tiny", "--config", str(path), "--out", str(out / "v.mp4")],
        "inference_configs.tile",
        out,
    )
