import pytest


@pytest.fixture(scope="session")
def tiny_models():
    from tempomaster.models.tiny import build_tiny_models

    return build_tiny_models()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny set written in the release's layout, once per test session."""
    from tempomaster.models.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt") / "checkpoints")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_models):
    """An fp32 ONNX build of the tiny preset at a small shape (32x48, 9 frames, [4,2,1])."""
    from tempomaster.export.build import export_onnx
    from tempomaster.export.shapes import ExportShape

    out = tmp_path_factory.mktemp("build") / "tiny"
    shape = ExportShape(height=32, width=48, num_frames=9, intervals=(4, 2, 1))
    export_onnx(tiny_models, "fp32", shape, out, preset_name="tiny", progress=False, copy=True)
    return out
