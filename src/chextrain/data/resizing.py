"""How a grey image becomes the network's S x S: stretch, pad (aspect kept) or crop (centred square).

Shared by data/images.py (decode and resize in one pass, `load_resized`) and data/transforms.py
(`resize` of an image already decoded), so both give the same bytes. Imports nothing of the package.
"""

from __future__ import annotations

from PIL import Image


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square crop, as torchxrayvision's XRayCenterCrop takes it."""
    side = min(width, height)
    return width // 2 - side // 2, height // 2 - side // 2, side


def resize_pil(image: Image.Image, size: int, mode: str = "stretch") -> Image.Image:
    """A grey PIL image -> size x size, bilinear: `stretch`, `pad` (aspect kept, black borders) or
    `crop` (the centred square, torchxrayvision's crop)."""
    if mode == "crop":
        left, top, side = centre_square(*image.size)
        image, mode = image.crop((left, top, left + side, top + side)), "stretch"
    if mode == "stretch":
        return image.resize((size, size), Image.Resampling.BILINEAR)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r}; expected 'stretch', 'pad' or 'crop'")
    w, h = image.size
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(image.resize((nw, nh), Image.Resampling.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
    return canvas
