"""A plain JPEG decoded by Pillow's own libjpeg decoder without Pillow's Python layers.

Most images a study reads are plain JPEGs (every CheXpert x-ray). For a small one (a 390 x 320
CheXpert-small x-ray, about 0.7 ms to decode) Pillow's Python around the decode (`Image.open`'s
marker parse, `ImageFile.load`'s read loop, about 60 us) is some 9% of the time. This module
finds what Pillow's JPEG decoder needs (size, components, scale) in one walk over the marker
segments and hands the whole file to that decoder in one call: the same C decoder, the same
libjpeg, the same arguments as `Image.open` + `draft("L", ...)` + `load`, so the same pixels
(tests/test_images_jpeg.py compares them at every scale, grey and colour, baseline and
progressive, with restart markers, and on damaged files). `python benchmarks/images.py` (d)
measures what it brings.

It takes only the files where that holds, and declines every other one (None), which the
caller then decodes the general way (data/images.py: `Image.open`), which also names what is
wrong with a damaged file:

- baseline, extended or progressive JPEGs (SOF0-2) of 8 bits with 1 or 3 components, whose
  segments before the scan are only tables (DHT, DQT, DRI), JFIF (APP0) and comments, read
  the same way by libjpeg and by Pillow's parser (`plain_frame`): so no EXIF or XMP, where an
  orientation can be, and no ICC, MPF or Adobe block, which Pillow reads in Python. The frame
  libjpeg decodes is the one found here; were it ever wider, the extra columns would come out
  zero, never stray memory, and a narrower, shorter or taller one declines the file;
- within the caller's pixel limit and Pillow's own decompression-bomb limit;
- decoded to the end without an error: a truncated or broken stream is declined.

The decoder is reached through `PIL.Image._getdecoder`, which `ImageFile.load` itself calls.
If a future Pillow moves it, every file is declined (slower, never wrong), and
`test_a_plain_jpeg_never_reaches_pillows_python_loader` fails to say so. Imports nothing of the
package.
"""

from __future__ import annotations

from PIL import Image

_PLAIN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # SOF0 baseline, SOF1 extended, SOF2 progressive
_RESTARTS = frozenset(range(0xD0, 0xD8))  # RST0-7: no length; libjpeg and Pillow step over them
_DQT, _APP0, _SCAN = 0xDB, 0xE0, 0xDA
# Segments with a length that libjpeg and Pillow both read or skip without a fuss: DHT, DQT, DRI,
# APP0, COM. Every other APPn is left out: Pillow parses EXIF, XMP, ICC, MPF, Photoshop and Adobe
# blocks in Python (orientation, profiles, MPO) and may refuse a malformed one.
_SEGMENTS = frozenset({0xC4, _DQT, 0xDD, _APP0, 0xFE})


def plain_frame(data: bytes | memoryview) -> tuple[int, int, int] | None:
    """(width, height, components) of a plain JPEG from its frame header; None for anything else.

    Walks the markers from the start-of-image marker to the first scan the way libjpeg and
    Pillow's parser both read them (fill bytes and RST markers stepped over), so the frame found
    is the one libjpeg decodes and Pillow would report. Declines, rather than guesses, wherever
    either would skip stray bytes, refuse the file or read more than this route does: stray bytes
    between segments, a marker outside DHT, DQT, DRI, APP0, COM and SOF0-2, a frame of other than
    8 bits, a second frame, a scan before the frame, a quantization segment that is not whole
    tables or a JFIF block too short for Pillow's reader (both refused by Pillow, not by
    libjpeg), or a segment that runs past the end of the data.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, frame = 2, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:  # stray bytes between segments
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if marker in _RESTARTS:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return None
        if marker == _SCAN:
            return frame
        if marker in _PLAIN_FRAMES:
            if frame is not None or length < 8 or data[pos + 4] != 8:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            frame = (width, height, data[pos + 9])
        elif marker not in _SEGMENTS:
            return None
        elif marker == _DQT and not _whole_tables(data, pos + 4, end):
            return None
        elif marker == _APP0 and bytes(data[pos + 4 : min(pos + 8, end)]) == b"JFIF" and length < 9:
            return None  # Pillow reads the JFIF version at bytes 5-6 of the block
        pos = end
    return None


def _whole_tables(data: bytes | memoryview, at: int, end: int) -> bool:
    """Whether a DQT segment's payload data[at:end] is whole tables, as Pillow's reader requires:
    each is a byte (precision, index) and 64 values of 1 byte (precision 0) or 2."""
    while at < end:
        at += 1 + 64 * (1 if data[at] >> 4 == 0 else 2)
    return at == end


def draft_scale(width: int, height: int, draft: int | None) -> int:
    """The reduction Pillow's JPEG `draft` picks for a request of draft x draft: 1, 2, 4 or 8."""
    if not draft:
        return 1
    scale = min(width // draft, height // draft)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def decode_plain(data: bytes | memoryview, draft: int | None, max_pixels: int) -> Image.Image | None:
    """A plain JPEG (see the module docstring) as a grey ("L") PIL image at the scale Pillow's
    `draft` picks for `draft` px (None: full size), or None when this route declines the file."""
    frame = plain_frame(data)
    if frame is None:
        return None
    width, height, components = frame
    pixels = width * height
    if components not in (1, 3) or not 0 < pixels <= max_pixels:
        return None
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:  # Pillow would warn or refuse
        return None
    scale = draft_scale(width, height, draft)
    size = (-(-width // scale), -(-height // scale))
    try:
        # What Image.open + draft("L", ...) + load pass: rawmode "L" (colour decodes to luma in
        # libjpeg), the colour space libjpeg reads from the file, the scale, no fast DCT.
        decoder = Image._getdecoder("L", "jpeg", ("L", ""), (scale, 0))
        image = Image.new("L", size, None)  # None: not filled, every pixel is decoded
        decoder.setimage(image.im, (0, 0, *size))
        try:
            consumed, code = decoder.decode(data)
        finally:
            decoder.cleanup()
    except (AttributeError, TypeError, ValueError, OSError):  # Pillow's internals moved or refused
        return None
    return image if consumed < 0 and code == 0 else None  # else truncated or broken: declined
