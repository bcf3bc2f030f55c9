"""Where a generation's time goes: named ranges for torch.profiler / NVTX, a per-stage breakdown, a bar chart.

    with profile_generation(out_dir) as prof:
        result = generate(prof.wrap(backend), tokenizer, request)
        with prof.phase("writing"):
            write_video(...)
    # out_dir/trace.json       Chrome trace (chrome://tracing, Perfetto): ranges "text",
    #                          "stage k", "step i", "backend.<call>", "writing" over the torch ops
    # out_dir/breakdown.json   seconds per row (text, stage 0.., writing) and category
    # out_dir/stages.png       the same as a stacked bar chart

The ranges come from a backend wrapper, so the pipeline needs no hooks: the
pipeline's structure is fixed (text once, then per stage one VAE encode, one
DiT call per step, VAE decodes), so a VAE encode opens a stage and a DiT call
opens a step, which lasts until the next DiT call or the stage's first VAE
decode. What a step spends outside its DiT call is the guidance and the Euler
update ("guidance" in the chart). On a GPU every backend call is synchronised
while profiling so that its wall time is its device time; the ranges also go
to NVTX (Nsight Systems).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..atomic_write import staged_file, write_text
from ..errors import UsageError
from .backends.base import Backend, BackendWrapper

# Categories of the chart, in drawing order; "other" is the runtime's own time.
CATEGORIES = ("text", "vae_encode", "dit", "guidance", "vae_decode", "writing", "other")
COLORS = {
    "text": (141, 110, 199),
    "vae_encode": (79, 152, 202),
    "dit": (230, 120, 50),
    "guidance": (240, 190, 60),
    "vae_decode": (90, 170, 110),
    "writing": (200, 80, 90),
    "other": (170, 170, 170),
}
_CALL_CATEGORY = {"encode_text": "text", "velocity": "dit", "vae_encode": "vae_encode", "vae_decode": "vae_decode"}


class _Range:
    """One named range, open from `open()` to `close()`: torch.profiler and, on a GPU, NVTX."""

    def __init__(self, name: str, nvtx: bool):
        self.name, self.nvtx = name, nvtx
        self._rf = torch.profiler.record_function(name)
        self.start = 0.0

    def open(self) -> _Range:
        self._rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self.start = time.perf_counter()
        return self

    def close(self) -> float:
        seconds = time.perf_counter() - self.start
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._rf.__exit__(None, None, None)
        return seconds


class StageTimer:
    """Seconds per row and category, and the ranges that mark them."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.nvtx = self.device.type == "cuda"
        self.rows: dict[str, dict[str, float]] = {}
        self.wall: dict[str, float] = {}
        self._stage: _Range | None = None
        self._step: _Range | None = None
        self._stage_index = -1
        self._step_index = 0
        self._step_dit = 0.0
        self._last_method: str | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _add(self, row: str, category: str, seconds: float) -> None:
        cats = self.rows.setdefault(row, {})
        cats[category] = cats.get(category, 0.0) + seconds

    def _row(self) -> str:
        return f"stage {self._stage_index}" if self._stage is not None else "text"

    def _close_step(self) -> None:
        if self._step is not None:
            self._sync()
            seconds = self._step.close()
            self._add(self._row(), "guidance", max(seconds - self._step_dit, 0.0))
            self._step = None

    def close_stage(self) -> None:
        self._close_step()
        if self._stage is not None:
            self.wall[self._row()] = self._stage.close()
            self._stage = None

    def before_call(self, method: str) -> None:
        last, self._last_method = self._last_method, method
        if method == "vae_encode" and last != "vae_encode":  # a stage starts with its chunks' VAE encodes
            self.close_stage()
            self._stage_index += 1
            self._step_index = 0
            self._stage = _Range(f"stage {self._stage_index}", self.nvtx).open()
        elif method == "velocity":  # a DiT call starts a step
            self._close_step()
            self._step = _Range(f"step {self._step_index}", self.nvtx).open()
            self._step_index += 1
            self._step_dit = 0.0
        elif method == "vae_decode":
            self._close_step()

    @contextmanager
    def call(self, method: str):
        self.before_call(method)
        self._sync()
        r = _Range(f"backend.{method}", self.nvtx).open()
        try:
            yield
        finally:
            self._sync()
            seconds = r.close()
            if method == "velocity":
                self._step_dit += seconds
            self._add(self._row(), _CALL_CATEGORY[method], seconds)

    @contextmanager
    def phase(self, name: str, category: str | None = None):
        """A named range outside the generation (e.g. "writing"); its own row of the chart."""
        self.close_stage()
        r = _Range(name, self.nvtx).open()
        try:
            yield
        finally:
            self._sync()
            seconds = r.close()
            self.wall[name] = self.wall.get(name, 0.0) + seconds
            self._add(name, category or name, seconds)

    def breakdown(self) -> dict[str, dict[str, float]]:
        """Rows in order (text, stage 0.., phases) -> category -> seconds; "other" is the row's unaccounted time."""
        self.close_stage()
        out = {}
        for row, cats in self.rows.items():
            cats = dict(cats)
            if row in self.wall:
                rest = self.wall[row] - sum(cats.values())
                if rest > 0:
                    cats["other"] = cats.get("other", 0.0) + rest
            out[row] = {c: round(cats[c], 6) for c in CATEGORIES if c in cats}
        return out


class ProfiledBackend(BackendWrapper):
    """Passes every call to `inner` inside a named range timed by `timer`."""

    def __init__(self, inner: Backend, timer: StageTimer):
        super().__init__(inner)
        self.timer = timer

    def encode_text(self, ids, mask):
        with self.timer.call("encode_text"):
            return self.inner.encode_text(ids, mask)

    def velocity(self, x, y, timestep, context, rope_cos, rope_sin):
        with self.timer.call("velocity"):
            return self.inner.velocity(x, y, timestep, context, rope_cos, rope_sin)

    def vae_encode(self, video):
        with self.timer.call("vae_encode"):
            return self.inner.vae_encode(video)

    def vae_decode(self, latents):
        with self.timer.call("vae_decode"):
            return self.inner.vae_decode(latents)


class GenerationProfile:
    """What `profile_generation` yields: wrap the backend with it, mark phases, read the breakdown."""

    def __init__(self, device: torch.device):
        self.timer = StageTimer(device)

    def wrap(self, backend: Backend) -> ProfiledBackend:
        return ProfiledBackend(backend, self.timer)

    def phase(self, name: str):
        return self.timer.phase(name)

    def breakdown(self) -> dict[str, dict[str, float]]:
        return self.timer.breakdown()


@contextmanager
def profile_generation(
    out_dir: str | os.PathLike, device: str | torch.device = "cpu", trace: bool = True, title: str | None = None
) -> Iterator[GenerationProfile]:
    """Profile what runs inside; on a clean exit write trace.json, breakdown.json and stages.png to `out_dir`.

    trace=False skips torch.profiler (no Chrome trace, and none of its overhead):
    only the breakdown and the chart.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--profile {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    prof = GenerationProfile(device)
    profiler = None
    if trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
    try:
        yield prof
    except BaseException:
        if profiler is not None:
            profiler.__exit__(None, None, None)
        raise
    breakdown = prof.breakdown()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        with staged_file(out / "trace.json", suffix=".json") as tmp:
            profiler.export_chrome_trace(str(tmp))
    write_text(out / "breakdown.json", json.dumps({"seconds": breakdown, "device": str(device)}, indent=1) + "\n")
    plot_breakdown(breakdown, out / "stages.png", title=title or "where the time went")


# ----------------------------------------------------------------------------
# The chart (PIL: no plotting library needed)
# ----------------------------------------------------------------------------


def _nice_step(span: float) -> float:
    raw = span / 5
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def plot_breakdown(breakdown: dict[str, dict[str, float]], path: str | os.PathLike, title: str = "") -> Path:
    """Horizontal stacked bars: one row per entry of `breakdown`, one colour per category (seconds)."""
    from PIL import Image, ImageDraw, ImageFont

    if not breakdown:
        raise ValueError("nothing to plot: the breakdown is empty")
    path = Path(path)
    font = ImageFont.load_default()
    rows = list(breakdown)
    total = max(sum(c.values()) for c in breakdown.values()) or 1.0
    left, right, top, row_h, bar_h = 90, 40, 48, 34, 22
    width = 820
    plot_w = width - left - right
    legend_y = top + row_h * len(rows) + 34
    height = legend_y + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((left, 12), title, fill="black", font=font)
    step = _nice_step(total)
    scale = plot_w / (step * (int(total / step) + 1))
    x_axis = top + row_h * len(rows) + 4
    tick = 0.0
    while left + tick * scale <= width - right + 0.5:
        x = left + tick * scale
        draw.line([(x, top - 4), (x, x_axis)], fill=(225, 225, 225))
        draw.text((x - 8, x_axis + 4), f"{tick:g}", fill="black", font=font)
        tick += step
    draw.text((width - right - 60, x_axis + 16), "seconds", fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + i * row_h
        draw.text((8, y + 5), row, fill="black", font=font)
        x = float(left)
        for cat in CATEGORIES:
            seconds = breakdown[row].get(cat, 0.0)
            if seconds <= 0:
                continue
            w = seconds * scale
            draw.rectangle([x, y, x + max(w, 1.0), y + bar_h], fill=COLORS[cat])
            x += w
        draw.text((x + 6, y + 5), f"{sum(breakdown[row].values()):.3g} s", fill="black", font=font)
    x = left
    for cat in CATEGORIES:
        draw.rectangle([x, legend_y, x + 12, legend_y + 12], fill=COLORS[cat])
        draw.text((x + 16, legend_y), cat, fill="black", font=font)
        x += 24 + int(draw.textlength(cat, font=font)) + 12
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
    return path
