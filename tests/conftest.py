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
