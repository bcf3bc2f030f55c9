"""Peak memory of a request, estimated from its plan before any model is loaded.

A request that cannot fit is refused in one line naming both numbers, rather
than loading the models and dying minutes later in an allocation.

The estimate adds, for the device that runs the networks and for the host:
- the weights (parameter counts of the preset's models, or the build's files);
- the largest working set of any stage: its latents and guidance temporaries,
  the activations of one DiT call (the whole stage batch, or the build's safe
  batch) and of one VAE step at full resolution (an encode step carries all
  the stage's chunks: one encode call per stage);
- on the host, the frames: the previous stage's decoded video, the current
  stage's decoded chunks and their concatenation (frames never live on an
  accelerator), and the stage's condition videos being built;
- on the host, the reference images' preparation: each image as float32 and
  its cover-resize (an image far from the output's aspect is resized to
  far more pixels than the output has), and the prepared frames.
Before any of this is planned, ``check_video_fits`` refuses by arithmetic
alone a video whose finished frames cannot fit (planning is linear in them).
Activation factors are counted per live tensor of the widest layer; they are
an upper-leaning estimate, checked against measured peaks in the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

from ..errors import UsageError

GIB = 2**30
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}

# Live tensors of the widest layer per token or pixel, in units of its width
# (input, normed copy, q/k/v or both FFN halves, output, residual).
DIT_LIVE_WIDTHS = 6
FFN_LIVE_WIDTHS = 2
VAE_LIVE_WIDTHS = 6  # residual block: input, two norm/act copies, conv out, cache copy, shortcut
# What a run maps after the check whatever its size: the models' modules, tokenizer,
# video encoder, allocator pools. Measured on the tiny preset at 17 and 433 frames:
# 234 MiB beyond the terms above in both (benchmarks/bench_memory.py).
RUNTIME_ALLOWANCE = 256 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    host_bytes: int
    device_bytes: int  # 0 when the networks run on the host
    device: str
    parts: dict  # name -> bytes, for the message and the tests

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v >= GIB / 100)
        return f"host {self.host_bytes / GIB:.2f} GiB, {self.device} {self.device_bytes / GIB:.2f} GiB ({parts} GiB)"


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _parameter_count(module_cls, cfg) -> int:
    import torch

    with torch.device("meta"):
        model = module_cls(cfg)
    return sum(p.numel() for p in model.parameters())


@cache  # once per (preset, dtype), not once per video of a --prompts run
def weight_bytes(preset, dtype: str) -> dict:
    """Bytes of each model's weights in the run's dtype (umT5 never in fp16)."""
    from ..models.dit import WanDiT
    from ..models.t5 import UMT5Encoder
    from ..models.vae import WanVAE

    width = _BYTES[dtype]
    t5_width = 4 if dtype == "fp16" else width
    return {
        "dit weights": _parameter_count(WanDiT, preset.dit) * width,
        "vae weights": _parameter_count(WanVAE, preset.vae) * width,
        "t5 weights": _parameter_count(UMT5Encoder, preset.t5) * t5_width,
    }


def _vae_step_bytes(vae_cfg, height: int, width: int, width_bytes: int) -> int:
    """One VAE step at full resolution: the widest top-level layers over 4 frames."""
    top_channels = vae_cfg.dim * vae_cfg.dim_mult[0]
    return VAE_LIVE_WIDTHS * top_channels * 4 * height * width * width_bytes


def _float32_frame_bytes(height: int, width: int) -> int:
    return 3 * height * width * 4


def reference_image_bytes(request) -> int:
    """Host bytes of preparing the request's reference images (pipeline.cover_resize_center_crop).

    One image at a time: its float32 copy and two temporaries of its size,
    then its cover-resize to ``(int(h*s), int(w*s))``; each prepared
    ``[3, H, W]`` frame is kept.  The decoded images themselves are already
    in this process (``current_rss``).
    """
    if not request.ref_images:
        return 0
    height, width = request.output_size()
    largest = 0
    for image in request.ref_images.values():
        h, w = image.height, image.width
        scale = max(height / h, width / w)
        resized = max(height, int(h * scale)) * max(width, int(w * scale))
        largest = max(largest, 3 * _float32_frame_bytes(h, w) + _float32_frame_bytes(1, resized))
    return largest + len(request.ref_images) * _float32_frame_bytes(height, width)


def check_video_fits(request, where: str = "") -> None:
    """Refuse, by arithmetic alone, a video whose finished frames (float32 on the host) exceed the memory
    available: one line naming --num-frames and the most that fit, before any stage is planned."""
    from ..planner import video_frame_count

    height, width = request.output_size()
    frames = video_frame_count(request.num_frames, request.frame_intervals)
    needed = frames * _float32_frame_bytes(height, width)
    have = available_host_bytes()
    if needed <= have:
        return
    growth = request.frame_intervals[0] // request.frame_intervals[-1]  # finished frames per stage-0 frame
    most = max(0, (have // _float32_frame_bytes(height, width) - 1) // growth)
    prefix = f"{where} " if where else ""
    raise UsageError(
        f"{prefix}--num-frames {request.num_frames}: the finished video alone ({frames} frames of {width}x{height}, "
        f"float32 on the host) needs {needed / GIB:.1f} GiB of host memory and {have / GIB:.1f} GiB is available; "
        f"reduce --num-frames (this bound alone allows at most {most} at this size) or --height/--width"
    )


def stage_working_set(preset, request, dtype: str, dit_batch_cap: int | None = None) -> list[dict]:
    """Per stage: bytes of latents, one DiT call, one VAE step, and host frames."""
    from ..planner import plan_stages

    height, width = request.output_size()
    stages = plan_stages(request.num_frames, request.frame_intervals, request.ref_images.keys())
    guided = request.guidance_scale != 1.0
    dit = preset.dit
    width_bytes = _BYTES[dtype]
    h, w = height // 8, width // 8
    tokens_per_frame = (h // dit.patch_size[1]) * (w // dit.patch_size[2])
    frame_bytes = 3 * height * width * 4  # decoded frames are float32 on the host
    out = []
    previous_frames = 0
    for stage in stages:
        n = len(stage.active_chunks)
        batch = n * (2 if guided else 1)
        call_batch = min(batch, dit_batch_cap) if dit_batch_cap else batch
        tokens = stage.latent_frames * tokens_per_frame
        latent = n * 16 * stage.latent_frames * h * w * 4
        # float32 x, v, v_cond, v_uncond and guidance temporaries, plus y (20 channels) and
        # x in the model dtype for both halves of the batch: about 10 stage latents
        latents = 10 * latent
        dit_call = call_batch * tokens * (DIT_LIVE_WIDTHS * dit.dim + FFN_LIVE_WIDTHS * dit.ffn_dim) * width_bytes
        # encode: the stage's chunks in one call; decode: one chunk per call
        vae_step = n * _vae_step_bytes(preset.vae, height, width, width_bytes)
        decoded = stage.padded_frames * frame_bytes
        host_frames = previous_frames * frame_bytes + 2 * decoded + n * stage.chunk_frames * frame_bytes
        out.append(
            {
                "stage": stage.index,
                "latents": latents,
                "dit call": dit_call,
                "vae step": vae_step,
                "host frames": host_frames,
            }
        )
        previous_frames = stage.total_frames
    return out


def estimate_peak_memory(preset, request, *, dtype: str, device: str, manifest=None) -> MemoryEstimate:
    """Peak host and device bytes for `request` on `preset`'s models (or a build's graphs)."""
    on_host = not device.startswith("cuda")
    if manifest is not None:
        # A build's graphs: their files, which a runtime holds about once in memory.
        files = manifest.data["files"]
        weights = {"graph weights": sum(int(f["bytes"]) for k, f in files.items() if k.startswith("onnx/"))}
        cap = int(manifest.graphs["dit"]["max_batch"]) if "dit" in manifest.graphs else None
    else:
        weights = weight_bytes(preset, dtype)
        cap = None
    stages = stage_working_set(preset, request, dtype, cap)
    worst = max(stages, key=lambda s: s["latents"] + max(s["dit call"], s["vae step"]))
    compute = worst["latents"] + max(worst["dit call"], worst["vae step"])
    host_frames = max(s["host frames"] for s in stages)
    references = reference_image_bytes(request)
    base = current_rss()
    parts = {
        "process now": base,
        "runtime libraries": RUNTIME_ALLOWANCE,
        **weights,
        "stage working set": compute,
        "frames on the host": host_frames,
        "reference images": references,
    }
    if on_host:
        host = base + RUNTIME_ALLOWANCE + sum(weights.values()) + compute + host_frames + references
        return MemoryEstimate(host_bytes=host, device_bytes=0, device=device, parts=parts)
    device_bytes = sum(weights.values()) + compute
    return MemoryEstimate(
        host_bytes=base + RUNTIME_ALLOWANCE + host_frames + references,
        device_bytes=device_bytes,
        device=device,
        parts=parts,
    )


def check_fits(estimate: MemoryEstimate, where: str = "") -> None:
    """Refuse, in one line naming both numbers, a request whose estimate exceeds what the machine has."""
    prefix = f"{where} " if where else ""
    needed_host = estimate.host_bytes - estimate.parts.get("process now", 0)
    have_host = available_host_bytes()
    if needed_host > have_host:
        images = estimate.parts.get("reference images", 0) * 2 > needed_host
        remedy = (
            "use reference images (--image) nearer the output's size and aspect ratio"
            if images
            else "reduce --num-frames, --height/--width or the number of stages"
        )
        raise UsageError(
            f"{prefix}this request needs about {estimate.host_bytes / GIB:.1f} GiB of host memory "
            f"({needed_host / GIB:.1f} GiB more than this process holds), and {have_host / GIB:.1f} GiB is available: "
            f"{remedy} ({estimate.describe()})"
        )
    if estimate.device_bytes:
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(estimate.device))
        if estimate.device_bytes > free:
            raise UsageError(
                f"{prefix}this request needs about {estimate.device_bytes / GIB:.1f} GiB on {estimate.device}, "
                f"which has {free / GIB:.1f} GiB free: reduce --num-frames or --height/--width, "
                f"or use engines with a smaller safe batch ({estimate.describe()})"
            )


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


__all__ = [
    "MemoryEstimate",
    "estimate_peak_memory",
    "check_fits",
    "check_video_fits",
    "current_rss",
    "available_host_bytes",
    "weight_bytes",
    "stage_working_set",
    "reference_image_bytes",
    "format_bytes",
]
