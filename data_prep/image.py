"""One image: decode any input to RGB, apply the §2 geometry, encode as JPEG.

`convert` never raises for a bad input: it returns a `Converted` with `skip_reason` set, so the
caller can list the file in the manifest instead of crashing or dropping it silently.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
PAPER_SIZE = 256  # §2: shorter side to 256, then the central 256×256 patch
# The rescale makes the long side 256·aspect pixels before the crop: a 1×20000 PNG of 164 bytes
# would become 256×5,120,000 (3.9 GB). Images longer than this many times their width (or the
# reverse) are skipped and listed; the bound keeps one rescale under 256×16384×3 = 12.6 MB.
MAX_ASPECT = 64


@dataclass(frozen=True)
class Converted:
    jpeg: bytes | None              # what goes into <split>.jpg.bin; None when skipped
    pixels: np.ndarray | None       # H×W×3 uint8 as stored (before JPEG encoding), for §4.1 statistics
    skip_reason: str | None = None
    converted_from: str | None = None  # e.g. "JPEG CMYK", "PNG RGB", "array L"; None when already an RGB JPEG
    passthrough: bool = False       # the source bytes were stored unchanged (no pixel change was needed)


class BadImage(Exception):
    """The input cannot be turned into an RGB image; the message is the manifest's reason."""


def decode(data: bytes | np.ndarray) -> Image.Image:
    """Decode file bytes (any format PIL reads, whatever the file name says) or a uint8 array."""
    if isinstance(data, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(data))
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": harmless for the pixels
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode here: a truncated file fails now, not later
    except OSError as e:
        # PIL's "image file is truncated" lands here. Policy: a partly decodable file is skipped,
        # not stored with a grey/black tail (PIL would need the global LOAD_TRUNCATED_IMAGES).
        kind = "truncated" if "truncated" in str(e) else "cannot decode"
        raise BadImage(f"{kind}: {e}") from None
    except Exception as e:  # PIL raises SyntaxError, ValueError, DecompressionBombError, ... on corrupt data
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """CMYK, grayscale, palette, bilevel, ... → RGB; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise BadImage(f"unsupported high-bit-depth mode {img.mode}")
        return img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"cannot convert mode {img.mode} to RGB: {e}") from None


def resize_center_crop(img: Image.Image, size: int = PAPER_SIZE, resample: str = "bicubic") -> Image.Image:
    """§2: rescale so the shorter side is `size`, then take the central size×size patch.

    The longer side is rounded to the nearest pixel; when the excess is odd the extra pixel is
    dropped from the right/bottom (offset = floor(excess / 2)).
    """
    w, h = img.size
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    left, top = (new_w - size) // 2, (new_h - size) // 2
    # DEVIATION(§2): for a strip (e.g. 1×100,000 px, aspect over 16) only the kept region is
    # resampled, not the whole image first (which would need gigabytes); its edge pixels then
    # differ slightly from resize-then-crop. Photographs never come near this.
    if max(new_w, new_h) > 16 * size:
        sx, sy = w / new_w, h / new_h
        return img.resize((size, size), RESAMPLE[resample], box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLE[resample])
    return img.crop((left, top, left + size, top + size))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)  # baseline, PIL's default 4:2:0 chroma subsampling
    return buf.getvalue()


def convert(data: bytes | np.ndarray, *, native_size: int | None, quality: int,
            resample: str = "bicubic") -> Converted:
    """Decode → RGB → geometry → JPEG. `native_size` S stores S×S sets unscaled (see README)."""
    try:
        img = decode(data)
        fmt, mode = ("array" if isinstance(data, np.ndarray) else img.format), img.mode
        rgb = to_rgb(img)
    except BadImage as e:
        return Converted(None, None, skip_reason=str(e))
    converted_from = None if (fmt, mode) == ("JPEG", "RGB") else f"{fmt} {mode}"
    w, h = rgb.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        return Converted(None, None, skip_reason=(
            f"aspect ratio {w}x{h} is beyond {MAX_ASPECT}:1 (its §2 rescale would be "
            f"{PAPER_SIZE}x{round(max(w, h) * PAPER_SIZE / max(min(w, h), 1)):,} pixels)"))
    target = native_size or PAPER_SIZE
    if native_size is not None:
        # DEVIATION(§2): sets of S×S images with S < 256 are stored unscaled; the loader
        # upsamples them to 256×256 at load time (storing 256 px copies would only add bytes).
        if rgb.size != (native_size, native_size):
            return Converted(None, None, skip_reason=(
                f"size {rgb.size[0]}x{rgb.size[1]} differs from the set's native {native_size}x{native_size}"))
        out = rgb
    else:
        out = resize_center_crop(rgb, PAPER_SIZE, resample)
    pixels = np.asarray(out, dtype=np.uint8)
    # Keep the source bytes when nothing about the pixels changes: no generation loss. Progressive
    # files are re-encoded as baseline so every stored image decodes the same way on CPU and GPU.
    keep = (converted_from is None and out.size == img.size == (target, target)
            and not img.info.get("progressive") and not img.info.get("progression"))
    if keep:
        return Converted(bytes(data), pixels, converted_from=None, passthrough=True)
    return Converted(encode_jpeg(out, quality), pixels, converted_from=converted_from)
