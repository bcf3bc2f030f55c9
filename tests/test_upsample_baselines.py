"""The measures and baselines of benchmarks/upsample_baselines.py, against independent computations."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "upsample_baselines.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("upsample_baselines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with torch's conv2d in float64: the same definition, another implementation."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None]
    f = lambda t: torch.nn.functional.conv2d(t, k)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())


def test_ssim_and_psnr(bench):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(24, 30, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, size=a.shape), 0, 255).astype(np.uint8)
    assert bench.ssim(a, a) == pytest.approx(1.0)
    assert bench.ssim(a, b) == pytest.approx(_torch_ssim(a, b), abs=1e-10)
    assert bench.ssim(a, b) < 0.99
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert bench.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))


def test_repeat_and_blend_by_hand(bench):
    kept = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 200)])
    rep = bench.lift_repeat(kept)
    assert [int(f[0, 0, 0]) for f in rep] == [0] * 4 + [100] * 4 + [200] * 4
    blend = bench.lift_blend(kept)
    assert [int(f[0, 0, 0]) for f in blend] == [0, 25, 50, 75, 100, 125, 150, 175, 200, 200, 200, 200]
    assert bench.between_frames(68) == [i for i in range(64) if i % 4]


def test_flow_follows_a_moving_patch(bench):
    pytest.importorskip("cv2")
    texture = np.random.default_rng(0).integers(60, 255, size=(16, 16, 3)).astype(np.uint8)

    def frame(x0: int) -> np.ndarray:
        img = np.full((64, 96, 3), 90, np.uint8)
        img[24:40, x0 : x0 + 16] = texture
        return img

    kept = np.stack([frame(20), frame(28)])  # 8 px in one kept step: 2 px per output frame
    truth = frame(24)  # t = 1/2
    flow, blend = bench.lift_flow(kept)[2], bench.lift_blend(kept)[2]
    assert bench.psnr(flow, truth) > 40 > bench.psnr(blend, truth)
