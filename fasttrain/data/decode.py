"""One decode policy for every loader: whatever the file, 8-bit RGB, upright as a photo viewer shows it.

- EXIF orientation is applied (a phone photo stored sideways with Orientation 6 comes out upright).
- 16-bit grayscale and 16-bit RGB keep their high byte (65535 -> 255, 257 -> 1), as Pillow already
  does for 16-bit RGB PNGs (DALI's decoder rounds value / 257 instead, so 16-bit files are decoded
  here for DALI too).
- Grayscale, palette (with or without transparency), LA/RGBA and 1-bit images become RGB the way
  Pillow's `convert("RGB")` does it: alpha is dropped, not composited. CMYK becomes RGB likewise.
- Animated GIF/WebP: the first frame.

The DataLoader decodes every file here. DALI decodes the formats whose pixels its own decoder
gives identically (`dali_decodes`); files of the other kinds are decoded here once and handed to
DALI as lossless PNGs (fasttrain/data/dali_loader.py), so both loaders see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow format names fasttrain reads, decided from a file's bytes, never from its name. They cover
# torchvision ImageFolder's extensions (jpg jpeg png ppm bmp pgm tif tiff webp) plus gif and jfif.
# Pillow's JPEG reader also opens MPO, the multi-picture JPEG many cameras write (format "MPO").
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "PPM")

# Pillow's own guard against decompression bombs refuses images above twice this many pixels.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# Bump when what open_rgb returns, or what dali_decodes says, changes: remembered verdicts and the
# PNG copies made for DALI (fasttrain/data/index.py, dali_loader.py) are keyed by it.
POLICY_VERSION = 1

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow image -> mode "RGB", 8 bits per channel, by the policy in the module docstring."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64)
        # 16-bit data keeps its high byte, like Pillow's own 16-bit RGB; Pillow's convert() would
        # clip every value above 255 to white. An "I" image that holds 8-bit values stays as it is.
        high = (values >> 8) if values.max(initial=0) > 255 or image.mode != "I" else values
        return Image.fromarray(np.clip(high, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":  # 32-bit float TIFF: taken as 0-255 values, clipped (no scale is recorded)
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_rgb(path: Path | str) -> Image.Image:
    """Decode one file by the policy: an upright 8-bit RGB Pillow image of the file's own size.

    Raises whatever Pillow raises for a damaged file (OSError for truncated data, SyntaxError,
    ValueError, UnidentifiedImageError...). The data index has already checked the pixel count
    against --max-image-pixels, so Pillow's own bomb guard is off here.
    """
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path, formats=FORMATS) as image:
        image.load()
        return to_rgb8(ImageOps.exif_transpose(image))


def describe(exc: BaseException) -> str:
    """An exception as "Type: first line of its message" (at most 120 characters of it)."""
    text = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}"


def decode_failure(exc: BaseException) -> str:
    """The reason recorded for a file that failed to decode."""
    return f"cannot be decoded ({describe(exc)})"


def problem(path: Path | str) -> str | None:
    """Why the decode policy cannot decode this file, or None: the full check of one file."""
    try:
        open_rgb(path)
    except Exception as exc:
        return decode_failure(exc)
    return None


def is_16_bit(image: Image.Image) -> bool:
    """Whether the file holds 16 bits per sample (Pillow opens 16-bit RGB/RGBA PNGs as 8-bit modes)."""
    return image.mode.startswith("I;16") or any(";16" in str(tile[3]) for tile in getattr(image, "tile", []) or [])


def dali_decodes(image: Image.Image) -> bool:
    """Whether DALI's decoder gives the policy's pixels for this file (a Pillow image, opened, not loaded).

    Measured on DALI 2.4's CPU decoder against open_rgb on generated files of every kind
    (tests/test_decode_policy.py keeps checking it): JPEG and MPO in RGB or grey (EXIF rotation
    included), and 8-bit PNG, BMP, PNM and WebP match exactly. The others go through Pillow:
    GIF (DALI has no GIF decoder), 16-bit files (DALI rounds value / 257 where Pillow keeps the high
    byte of 16-bit RGB), CMYK (the two convert to RGB one level apart), TIFF (many variants), and
    WebP files carrying EXIF (nvImageCodec 0.9 misreads some of them).
    """
    fmt, mode = image.format, image.mode
    if is_16_bit(image):
        return False
    if fmt in ("JPEG", "MPO"):
        return mode in ("RGB", "L")
    if fmt == "WEBP" and "exif" in image.info:
        return False
    if fmt in ("PNG", "BMP", "PPM", "WEBP"):
        return mode in ("RGB", "RGBA", "L", "LA", "P", "1")
    return False
