"""Image bytes → RGB-ready PIL image, refusing non-images, disallowed formats and decompression bombs.

Order of checks, cheapest first and nothing decoded before it is needed:
1. the format is sniffed from the magic bytes with Pillow's own `accept` functions (no parsing),
   so a disallowed format is refused (415) before any of its plugin code runs on the body;
2. `Image.open` reads only the header, so the pixel count and sides are checked (413) before the
   pixel data is decompressed;
3. only then is the image loaded; truncation and corruption surface here (400).

Issue 17 added, all of it run in the preprocessing pool (service/preprocess.py), never on the event loop:
- a PNG's chunk list is walked here first, cheaply, with caps on the chunk count and on the bytes of
  ancillary chunks, so Pillow never walks a million empty chunks (`check_png_chunks`);
- a large image is decoded straight towards the model's input size (`ModelInputSize`): JPEG through
  Pillow's `draft` (DCT scaling), anything else reduced by an integer factor after decoding, and the part
  a centre-cropping processor would throw away is cropped first, so an 8192×1 image costs what a small
  one does;
- EXIF orientation is applied, so a photo is seen the way it was taken;
- error messages never carry an object repr or a path (`public_detail`).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

_SNIFF_BYTES = 64  # enough for every Pillow `accept` check (WebP needs 12, ICNS/TIFF less)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Reprs (`<_io.BytesIO object at 0x7f..>`) and absolute paths must never reach a client.
_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]*")


@dataclass(frozen=True)
class ImageLimits:
    allowed_formats: tuple[str, ...]
    max_pixels: int
    max_side: int
    max_png_chunks: int = 8192
    max_png_ancillary_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_formats(cls, formats: Iterable[str], max_pixels: int, max_side: int, **png: int) -> ImageLimits:
        return cls(tuple(f.upper() for f in formats), max_pixels, max_side, **png)


@dataclass(frozen=True)
class ModelInputSize:
    """What a centre-cropping image processor (CLIP's, LLaVA's) does: resize the shortest side to `short`,
    then crop `crop` = (width, height) from the middle. Known for those processors only; None elsewhere."""

    short: int
    crop: tuple[int, int]

    @classmethod
    def of(cls, image_processor: Any) -> ModelInputSize | None:
        size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
        if not getattr(image_processor, "do_center_crop", False) or crop is None:
            return None
        short = _field(size, "shortest_edge")
        width, height = _field(crop, "width"), _field(crop, "height")
        if not (isinstance(short, int) and isinstance(width, int) and isinstance(height, int)):
            return None
        return cls(short, (width, height))


def _field(value: Any, name: str) -> Any:
    """A size entry from a plain dict or transformers' SizeDict (attributes)."""
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def public_detail(exc: BaseException) -> str:
    """An exception's message fit for a client: object reprs and absolute paths removed."""
    # A path keeps its last component only ("…/missing"): enough to recognise, nothing about the layout.
    text = _PATH.sub(lambda m: "…/" + m.group().rstrip("/").rsplit("/", 1)[-1],
                     _REPR.sub("<data>", str(exc) or type(exc).__name__))
    return text[:300]


def check_png_chunks(data: bytes, limits: ImageLimits) -> None:
    """Walk a PNG's chunk headers (12 bytes each, no CRC or content work) up to IEND, refusing more than
    `max_png_chunks` chunks or more than `max_png_ancillary_bytes` in ancillary (lower-case) chunks before
    Pillow's own, much slower walk. A file that ends early is left for Pillow to call truncated."""
    position, count, ancillary = len(_PNG_SIGNATURE), 0, 0
    end = len(data)
    while position + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, position)
        count += 1
        if count > limits.max_png_chunks:
            raise InvalidImage(f"the PNG has more than {limits.max_png_chunks} chunks", param="image")
        if kind[:1].islower():  # ancillary: text, metadata, private chunks
            ancillary += length
            if ancillary > limits.max_png_ancillary_bytes:
                raise InvalidImage(f"the PNG carries more than {limits.max_png_ancillary_bytes} bytes of ancillary "
                                   "chunks (metadata)", param="image")
        if kind == b"IEND":
            return
        position += 12 + length


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
    if fmt == "PNG":
        check_png_chunks(data, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fired first (over twice its global limit); its message quotes Pillow's limit,
        # not this server's, so name ours and keep Pillow's size figure as the detail.
        raise _too_large(f"the image header declares more than the limit of {limits.max_pixels} pixels "
                         f"({limits.max_side} per side): {public_detail(exc)}") from exc
    except Exception as exc:  # malformed headers make plugins raise anything (struct.error, SyntaxError...)
        raise InvalidImage(f"cannot read the {fmt} image header: {public_detail(exc)}", param="image") from exc
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
        raise InvalidImage(f"the {image.format} image is truncated or corrupt: {public_detail(exc)}",
                           param="image") from exc
    return image


def decode_for_model(data: bytes, limits: ImageLimits, target: ModelInputSize | None) -> Image.Image:
    """Bytes → an RGB image no larger than the model needs (the preprocessing pool runs this).

    Checks as `open_image`; then JPEG is decoded at the smallest DCT scale still at least twice the model's
    input (`draft`), the EXIF orientation is applied, and a much larger or much longer image is reduced
    and cropped to what the processor would keep. Ordinary images (within 4x of the input size, ordinary
    aspect ratios) pass unchanged, so the processor sees exactly what it saw before."""
    image = open_image(data, limits)
    if target is not None and image.format == "JPEG":
        image.draft("RGB", (2 * target.short, 2 * target.short))  # keeps both sides >= the requested box
    image = load_image(image)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block: the pixels are still good, the orientation is not
        raise InvalidImage(f"the image's EXIF data is corrupt: {public_detail(exc)}", param="image") from exc
    if target is not None:
        image = _fit(image, target)
    return image.convert("RGB")


def _fit(image: Image.Image, target: ModelInputSize) -> Image.Image:
    width, height = image.size
    short = min(width, height)
    if short >= 4 * target.short:  # far larger than needed: integer box reduction, still >= 2x the input
        factor = short // (2 * target.short)
        image = image.reduce(factor)
        width, height = image.size
        short = min(width, height)
    # The processor scales by target.short / short, then keeps only a crop-sized box in the middle; in this
    # image's pixels that box is crop / scale, plus a margin for the resampling filter's reach.
    scale = target.short / short
    keep_w = int(target.crop[0] / scale) + 2 * (int(3 / scale) + 2)
    keep_h = int(target.crop[1] / scale) + 2 * (int(3 / scale) + 2)
    if width > 4 * keep_w or height > 4 * keep_h:  # only extreme shapes: ordinary ones stay untouched
        new_w, new_h = min(width, keep_w), min(height, keep_h)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        image = image.crop((left, top, left + new_w, top + new_h))
    return image


def _too_large(message: str) -> PayloadTooLarge:
    return PayloadTooLarge(message, code="image_too_large", param="image")
