"""What the two backends over a tm-export build (onnxruntime, tensorrt) do the same way.

A subclass opens the build's graphs as runners (``self.graphs``: name ->
runner with ``spec``, ``max_batch`` and ``dtype(name)``) and implements the
text and DiT calls and ``_stream``, the causal VAE step loop on its runtime.
This class holds what reads only the manifest (the request check, the
tokenizer, the tiling) and the VAE's batching and tiling around ``_stream``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

from ...build_format import GRAPH_NAMES
from ...engines.manifest import Manifest, ManifestError
from ...models.vae_tiling import TileSpec, resolve_tile, tiled_decode, tiled_encode
from .base import Backend, batch_slices, decoder_steps, encoder_steps


def build_tiling(manifest: Manifest, tile: bool | TileSpec) -> tuple[TileSpec | None, dict[tuple[int, int], str]]:
    """The tiling to run on this build and its VAE graph suffix per latent tile
    shape; a one-line ManifestError when the request and the build disagree."""
    record = manifest.data.get("tiling")
    built = TileSpec.from_dict(record) if record else None
    asked = resolve_tile(tile)
    if asked is not None and built is None:
        raise ManifestError(
            f"{manifest.root}: the build was exported without tiling; re-export it with tm-export --tile, or run without --tile"
        )
    if asked is None and built is not None:
        raise ManifestError(
            f"{manifest.root}: the build was exported for tiled VAE calls (tile {list(built.size)}, stride {list(built.stride)}); "
            "run with --tile, or re-export without --tile"
        )
    if asked is not None and tile is not True and asked != built:
        raise ManifestError(f"{manifest.root}: the build was tiled with {built.as_dict()}, asked {asked.as_dict()}")
    suffixes = {tuple(t["latent"]): t["suffix"] for t in record["tiles"]} if record else {}
    return built, suffixes


class BuildBackend(Backend):
    manifest: Manifest
    graphs: dict
    tile: TileSpec | None
    _tile_suffix: dict[tuple[int, int], str]
    spatial_ratio: int
    files = "graphs"  # what the build's runnable files are called in messages
    export_command = "tm-export onnx"

    @staticmethod
    def check_build(manifest: Manifest, build_dir, tile: bool | TileSpec) -> None:
        """Refuse, in one line, a build that cannot serve tm-run: tiling asked and built disagree, a graph missing."""
        build_tiling(manifest, tile)
        missing = [n for n in GRAPH_NAMES if n not in manifest.graphs]
        if missing:
            raise ManifestError(f"{build_dir}: the build lacks graphs {missing}; export all graphs to run tm-run")

    def check_request(self, height: int, width: int, num_frames: int, intervals: Sequence[int]) -> None:
        from ...engines.manifest import check_request

        check_request(self.manifest, height=height, width=width, num_frames=num_frames, intervals=intervals)

    def tokenizer(self, checkpoints: Path | None = None, config: Path | None = None):
        """The build's tokenizer: its own copy if it has one, the built-in tiny one, or the checkpoints'."""
        from ...models.tokenizer import PromptTokenizer, tiny_tokenizer

        seq_len = self.info.text_len
        own = self.manifest.root / "tokenizer"
        if own.is_dir():
            return PromptTokenizer.from_dir(own, seq_len=seq_len)
        if self.manifest.preset == "tiny" and checkpoints is None and config is None:
            return tiny_tokenizer(seq_len=seq_len)
        if checkpoints is not None or config is not None:
            from ...models.checkpoints import CheckpointPaths

            paths = (
                CheckpointPaths.from_dir(checkpoints) if checkpoints else CheckpointPaths.from_release_config(config)
            )
            return PromptTokenizer.from_dir(paths.tokenizer, seq_len=seq_len)
        raise ManifestError(
            f"{self.manifest.root}: the build has no tokenizer/ folder; give --checkpoints DIR or --config to find the tokenizer"
        )

    # -- the VAE around each runtime's step loop ----------------------------------

    @abstractmethod
    def _stream(self, first, rest, data_name: str, out_name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        """Run the causal step graphs over `pieces` (time slices), carrying every cache tensor."""

    def _vae_pair(self, direction: str, latent_hw: tuple[int, int]) -> tuple:
        """(first-step runner, later-step runner) of the encoder or decoder for this latent size."""
        suffix = ""
        if self.tile is not None:
            try:
                suffix = self._tile_suffix[tuple(latent_hw)]
            except KeyError:
                raise ManifestError(
                    f"{self.manifest.root}: the build has no VAE {self.files} for a {latent_hw[0]}x{latent_hw[1]} latent tile "
                    f"(it has {', '.join(f'{h}x{w}' for h, w in self._tile_suffix)}); export one for this request "
                    f"({self.export_command} --tile)"
                ) from None
        return self.graphs[f"vae_{direction}_first{suffix}"], self.graphs[f"vae_{direction}{suffix}"]

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        r = self.spatial_ratio
        first, rest = self._vae_pair("encoder", (video.shape[-2] // r, video.shape[-1] // r))
        step = int(rest.spec["meta"]["in_frames"])
        outs = []
        for s in batch_slices(video.shape[0], min(first.max_batch, rest.max_batch)):
            outs.append(self._stream(first, rest, "frames", "latents", encoder_steps(video[s], step)))
        return torch.cat(outs)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unclamped frames in the graph's dtype."""
        first, rest = self._vae_pair("decoder", tuple(latents.shape[-2:]))
        outs = []
        for s in batch_slices(latents.shape[0], min(first.max_batch, rest.max_batch)):
            outs.append(self._stream(first, rest, "latents", "frames", decoder_steps(latents[s])))
        return torch.cat(outs)

    def _tiled(self, tiler, run, x: torch.Tensor, graph: str, tensor: str) -> torch.Tensor:
        """`run` over the release's tiles of x, blended on the host (tiler: tiled_encode | tiled_decode)."""
        # Sums in the graph's input dtype, as the release sums in its run's dtype.
        x = x.to("cpu", self.graphs[graph].dtype(tensor))
        return tiler(run, x, self.tile, self.spatial_ratio, device=self.device).to(self.device).float()

    def vae_encode(self, video):
        if self.tile is not None:
            return self._tiled(tiled_encode, self._encode, video, "vae_encoder_first", "frames")
        return self._encode(video).float()

    def vae_decode(self, latents):
        if self.tile is not None:
            return self._tiled(tiled_decode, self._decode, latents, "vae_decoder_first", "latents")
        return self._decode(latents).float().clamp(-1, 1)
