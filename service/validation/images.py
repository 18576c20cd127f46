"""Image bytes → RGB-ready PIL image, refusing non-images, disallowed formats and decompression bombs.

Order of checks, cheapest first and nothing decoded before it is needed:
1. the format is sniffed from the magic bytes with Pillow's own `accept` functions (no parsing),
   so a disallowed format is refused (415) before any of its plugin code runs on the body;
2. `Image.open` reads only the header, so the pixel count and sides are checked (413) before the
   pixel data is decompressed;
3. only then is the image loaded; truncation and corruption surface here (400).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

_SNIFF_BYTES = 64  # enough for every Pillow `accept` check (WebP needs 12, ICNS/TIFF less)


@dataclass(frozen=True)
class ImageLimits:
    allowed_formats: tuple[str, ...]
    max_pixels: int
    max_side: int

    @classmethod
    def from_formats(cls, formats: Iterable[str], max_pixels: int, max_side: int) -> ImageLimits:
        return cls(tuple(f.upper() for f in formats), max_pixels, max_side)


def sniff_format(data: bytes, preferred: Iterable[str] = ()) -> str | None:
    """The Pillow format whose magic bytes match, trying `preferred` first; None if nothing matches."""
    Image.init()
    prefix = data[:_SNIFF_BYTES]
    preferred = tuple(preferred)
    candidates = [*preferred, *(f for f in Image.OPEN if f not in preferred)]
    for fmt in candidates:
        entry = Image.OPEN.get(fmt)
        if entry is None or entry[1] is None:
            continue
        try:
            if entry[1](prefix):
                return fmt
        except Exception:  # an accept() choking on a short or odd prefix just means "not this format"
            continue
    return None


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Steps 1-2: format and size checks from the magic bytes and the header only (cheap: no pixels)."""
    allowed = ", ".join(limits.allowed_formats)
    if not data:
        raise InvalidImage("the image is empty (0 bytes)", param="image")
    fmt = sniff_format(data, limits.allowed_formats)
    if fmt is None:
        raise InvalidImage(f"the image bytes are not a recognised image format (allowed: {allowed})",
                           param="image")
    if fmt not in limits.allowed_formats:
        raise UnsupportedMediaType(f"image format {fmt} is not allowed (allowed: {allowed})",
                                   code="unsupported_image_format", param="image")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fired first (over twice its global limit); its message quotes Pillow's limit,
        # not this server's, so name ours and keep Pillow's size figure as the detail.
        raise _too_large(f"the image header declares more than the limit of {limits.max_pixels} pixels "
                         f"({limits.max_side} per side): {exc}") from exc
    except Exception as exc:  # malformed headers make plugins raise anything (struct.error, SyntaxError...)
        raise InvalidImage(f"cannot read the {fmt} image header: {exc}", param="image") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the {fmt} image has an empty size {width}x{height}", param="image")
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise _too_large(f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_pixels} pixels and {limits.max_side} per side")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """Step 3: decompress the pixels (cost grows with the pixel count, not the byte count)."""
    try:
        image.load()
    except Exception as exc:
        raise InvalidImage(f"the {image.format} image is truncated or corrupt: {exc}", param="image") from exc
    return image


def _too_large(message: str) -> PayloadTooLarge:
    return PayloadTooLarge(message, code="image_too_large", param="image")
