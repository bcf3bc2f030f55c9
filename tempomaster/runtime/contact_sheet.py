"""A contact sheet of blueprints: each one's middle frame, labelled with its prompt and seed (Pillow).

For people who would rather look than read: `tm-run generate --prompts FILE
--seeds 0-7 --stop-after 0` writes one beside the videos. The PNG carries a
text chunk naming its maker, so an existing sheet is replaced only when
tm-run drew it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic_write import staged_file

SHEET_MAKER = "tm-run blueprint contact sheet"
_MAKER_KEY = "Software"


def foreign_sheet(path: Path) -> str | None:
    """Why an existing file at `path` may not be replaced (tm-run did not draw it), or None."""
    from PIL import Image

    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        return "exists and is not a contact sheet tm-run drew"
    try:
        with Image.open(path) as img:
            ours = img.format == "PNG" and img.info.get(_MAKER_KEY) == SHEET_MAKER
    except (OSError, ValueError):
        ours = False
    return None if ours else "exists and is not a contact sheet tm-run drew"


def middle_frame(frames) -> np.ndarray:
    """uint8 [H, W, 3] of a clip's frame T // 2 (frames [3, T, H, W] in [-1, 1], as the pipeline's)."""
    from .video import to_uint8_frames

    return to_uint8_frames(frames[:, frames.shape[1] // 2 : frames.shape[1] // 2 + 1])[0]


def draw_contact_sheet(
    tiles: Sequence[np.ndarray],
    labels: Sequence[str],
    columns: int = 4,
    scale: int = 2,
    label_lines: int = 3,
    gap: int = 6,
):
    """A PIL image: the tiles (uint8 [H, W, 3], one size) in rows of `columns`, each over its label."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    h, w = tiles[0].shape[:2]
    tile_w, tile_h = w * scale, h * scale
    line_h = 12
    chars = max(8, tile_w // 6)  # the default bitmap font is about 6 px a character
    cell_h = tile_h + label_lines * line_h + 4
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (tile_w + gap) + gap, rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x = gap + (i % columns) * (tile_w + gap)
        y = gap + (i // columns) * (cell_h + gap)
        sheet.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        lines = textwrap.wrap(label, chars)[:label_lines] or [""]
        for k, line in enumerate(lines):
            draw.text((x, y + tile_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def write_contact_sheet(path: Path, tiles: Sequence[np.ndarray], labels: Sequence[str]) -> Path:
    """The sheet of `tiles` (uint8 [H, W, 3] each) at `path`, atomically, marked as tm-run's."""
    from PIL.PngImagePlugin import PngInfo

    sheet = draw_contact_sheet(tiles, labels)
    info = PngInfo()
    info.add_text(_MAKER_KEY, SHEET_MAKER)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG", pnginfo=info)
    return path
