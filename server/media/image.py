"""Decode images safely and size them to the pixel budget a request's `detail` asks for.

Qwen2-VL turns every 28x28 pixel block into one visual token (14-pixel patches, merged 2x2), so
a pixel budget is a token budget:

    detail   max pixels              max visual tokens   roughly
    low      256 * 28 * 28 = 200,704          256         448 x 448
    auto   1,280 * 28 * 28 = 1,003,520      1,280       1000 x 1000 (Qwen's recommended default;
                                                         --auto-image-tokens sets it)
    high   the checkpoint's processor max (12,845,056 = 16,384 tokens for Qwen2-VL-Instruct)

Qwen3-VL's tokens are 32x32 pixels (16-pixel patches): the same token budgets, in its pixels.
Every image keeps its aspect ratio and is resized to multiples of the token side by Qwen's own
`smart_resize` (the processor then leaves it as it is).
"""

from __future__ import annotations

import io
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from server.exceptions import MediaError
from server.media.frames import MAX_ASPECT_RATIO, TOKEN_SIDE

Detail = Literal["low", "high", "auto"]

MIN_TOKENS = 4
LOW_DETAIL_TOKENS = 256
AUTO_DETAIL_TOKENS = 1280
PIXELS_PER_TOKEN = TOKEN_SIDE * TOKEN_SIDE
MIN_PIXELS = MIN_TOKENS * PIXELS_PER_TOKEN
LOW_DETAIL_MAX_PIXELS = LOW_DETAIL_TOKENS * PIXELS_PER_TOKEN
AUTO_DETAIL_MAX_PIXELS = AUTO_DETAIL_TOKENS * PIXELS_PER_TOKEN
# Past MAX_ASPECT_RATIO (which Qwen's smart_resize refuses), a strip (a 3000x10 banner, which
# hosted APIs read) is padded to it first, black bands on its short side.
# Decoders we trust for untrusted input; everything else is refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
IMAGE_FORMATS = ", ".join(f.lower() for f in ALLOWED_FORMATS)  # (for error messages)
# A decoded image larger than this (from a small file) is a decompression bomb.
MAX_DECODED_PIXELS = 64 * 1024 * 1024


# Pillow's own bomb check, set explicitly: it fires inside Image.open for absurd headers.
Image.MAX_IMAGE_PIXELS = MAX_DECODED_PIXELS


def bomb_size(exc: Exception) -> str:
    """The size Pillow's decompression-bomb error names, as an error message says it."""
    found = re.search(r"\((\d+) pixels\)", str(exc))  # (Pillow's words: its size)
    return f"{found.group(1)} pixels" if found else "too large"


def _too_large(param: str, size: str) -> MediaError:
    return MediaError(
        f"The image at {param} is {size}, above the server's limit of {MAX_DECODED_PIXELS} pixels.",
        param=param,
        code="image_too_large",
    )


def max_pixels_for(
    detail: Detail,
    model_max_pixels: int,
    side: int = TOKEN_SIDE,
    auto_tokens: int = AUTO_DETAIL_TOKENS,
) -> int:
    """auto_tokens: detail auto's budget (0: the model's ceiling, as high; MIN_TOKENS at
    least)."""
    if detail == "low":
        return min(LOW_DETAIL_TOKENS * side * side, model_max_pixels)
    if detail == "high" or not auto_tokens:
        return model_max_pixels
    return min(max(auto_tokens, MIN_TOKENS) * side * side, model_max_pixels)


def padded_size(width: int, height: int) -> tuple[int, int]:
    """The size with its short side lengthened to at most MAX_ASPECT_RATIO:1 (the same size
    for any usual image)."""
    return max(width, -(-height // MAX_ASPECT_RATIO)), max(height, -(-width // MAX_ASPECT_RATIO))


def target_size(
    width: int, height: int, max_pixels: int, side: int = TOKEN_SIDE, min_pixels: int = 0
) -> tuple[int, int]:
    """(width, height): multiples of the token side, aspect ratio kept (past 200:1, that of
    the padded image), area within [min_pixels (at least MIN_TOKENS tokens), max_pixels]."""
    width, height = padded_size(width, height)
    floor = min(max(min_pixels, MIN_TOKENS * side * side), max_pixels)
    new_height, new_width = smart_resize(
        height, width, factor=side, min_pixels=floor, max_pixels=max_pixels
    )
    if new_width * new_height > max_pixels:  # (enlarged to a min_pixels at max_pixels, its
        # sides rounded up past it: shrunk back under, as the model's ceiling is never passed)
        new_height, new_width = smart_resize(new_height, new_width, side, 0, max_pixels)
    # Its rounding to the token side can leave a near-200:1 strip past it (19900x100 became
    # 14112x56), which the processor's own resize refuses: the long side is cut back.
    longest = MAX_ASPECT_RATIO * min(new_width, new_height) // side * side
    return min(new_width, longest), min(new_height, longest)


# What decoding takes a pixel, at most: the decoded image (up to 4 bytes, RGBA or 16-bit
# gray), its RGB copy (3), the white canvas and alpha of a transparent one (4), and a margin
# for the EXIF turn and the resize. Measured peaks (a 4096x4096 PNG, max RSS): RGB 12 bytes,
# RGBA 13, 16-bit gray 9.
DECODE_BYTES_PER_PIXEL = 16
# And a row: Pillow keeps an image row by row, a pointer and an allocation each (a strip 1 pixel
# wide and 16 million tall took 30 bytes a row on top of its pixels; 1x67,108,864, within the
# pixel limit, took 2.6 GB). Counted along the longer side: the EXIF turn may make it the rows.
DECODE_BYTES_PER_ROW = 32
# The most one image's decode may take: what the largest image allowed takes (64 MP).
MAX_DECODE_BYTES = MAX_DECODED_PIXELS * DECODE_BYTES_PER_PIXEL


def decode_cost(width: int, height: int) -> int:
    """The bytes decoding a width x height image takes, at most."""
    return width * height * DECODE_BYTES_PER_PIXEL + max(width, height) * DECODE_BYTES_PER_ROW


# How the image formats read here begin (WebP: "RIFF", 4 bytes of size, "WEBP").
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def looks_like_image(head: bytes) -> bool:
    """Whether a file's first bytes (16 are enough) are those of an image format read here."""
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone; None when it cannot be read (decode_image then
    refuses the image, naming the reason)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            return probe.size
    except Exception:  # (Pillow's header errors vary by format)
        return None


def decoded_bytes(size: tuple[int, int] | None) -> int:
    """The bytes decoding an image of this (decoded_size) size will take."""
    if size is None:
        return 0
    return min(decode_cost(*size), MAX_DECODE_BYTES)


JPEG_SIGNATURE = b"\xff\xd8\xff"


def jpeg_draft_side(size: tuple[int, int], pixels: tuple[int, int], side: int) -> int:
    """The side a JPEG of this size must keep (both ways) when decoded for this pixel range:
    the longer side of its target, either way round (its EXIF turn is read later)."""
    try:
        return max(target_size(*size, pixels[1], side, pixels[0]))
    except ValueError:  # (a shape refused once decoded)
        return max(size)


def _baseline_jpeg(data: bytes) -> bool:
    """A JPEG whose frame is baseline or extended sequential (SOF0/SOF1), by walking its
    segments to the frame header. A progressive one (SOF2) keeps every coefficient at full
    size whatever its draft scale (measured: 143 MB for a 48 MP photo drafted to 1/8), so its
    decode memory is reckoned whole."""
    if not data.startswith(JPEG_SIGNATURE):
        return False
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xC0, 0xC1):
            return True
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # (other frames)
            return False
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return False


def _full_size(size: tuple[int, int], drafted: tuple[int, int]) -> tuple[int, int]:
    """The size as displayed of an image whose header says `size` and that decoded (drafted,
    perhaps turned by its EXIF orientation) to `drafted`: its target is reckoned from this,
    as before drafting (the draft's rounded-up sides moved 0.6% of targets by a token)."""
    for scale in (1, 2, 4, 8):
        scaled = (-(-size[0] // scale), -(-size[1] // scale))
        if drafted == scaled:
            return size
        if drafted == scaled[::-1]:
            return (size[1], size[0])
    return drafted


def decoded_size(
    data: bytes, size: tuple[int, int] | None, pixels: tuple[int, int], side: int
) -> tuple[int, int] | None:
    """The size decode_image gives an image of this header size: a JPEG at least twice its
    target both ways is decoded at 1/2, 1/4 or 1/8 of it (Pillow's draft: the DCT scales it
    down as it decodes), as the largest of those that keeps its target's longer side. A 64 MP
    photo takes 1/64 of the memory and time, and does not hold every other image's decode
    behind it (it took the whole --image-decode-memory)."""
    if size is None or not _baseline_jpeg(data):
        return size
    keep = jpeg_draft_side(size, pixels, side)
    fits = min(size) // max(keep, 1)
    scale = next((a for a in (8, 4, 2) if fits >= a), 1)  # (Pillow's choice for (keep, keep))
    return (-(-size[0] // scale), -(-size[1] // scale))


def pixel_range(
    detail: Detail,
    model_max_pixels: int,
    side: int,
    model_min_pixels: int,
    pixels: tuple[int | None, int | None],
    auto_tokens: int = AUTO_DETAIL_TOKENS,
) -> tuple[int, int]:
    """(min, max) pixels an image is resized into: detail's budget from the checkpoint's
    smallest image, or the request's own range. As Qwen's processor takes one, its min_pixels
    replaces the checkpoint's (Qwen3-VL's 65,536), its max_pixels is never passed (it wins
    over a min above it), and the model's ceiling stays."""
    wanted_min, wanted_max = pixels
    max_pixels = max_pixels_for(detail, model_max_pixels, side, auto_tokens)
    if wanted_min is not None or wanted_max is not None:  # the request's range, not detail's
        max_pixels = min(wanted_max or model_max_pixels, model_max_pixels)
    return (model_min_pixels if wanted_min is None else wanted_min), max_pixels


def visual_tokens(size: tuple[int, int], pixels: tuple[int, int], side: int) -> int:
    """The tokens an image of this size becomes, resized into pixels (min, max) (0 if its
    shape is refused when decoded)."""
    try:
        width, height = target_size(*size, pixels[1], side, pixels[0])
    except ValueError:
        return 0
    return (width // side) * (height // side)


# ISO base media files that are still images (HEIF, AVIF), not videos: the ftyp box's brand.
IMAGE_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"hevc", b"mif1", b"msf1"})


def looks_like_video(data: bytes) -> bool:
    """A video container's signature (MP4/MOV's ftyp box, but not an image's brand, AVIF or
    HEIC; Matroska/WebM's EBML header; AVI's RIFF): bytes sent as an image that are a video."""
    return (
        (data[4:8] == b"ftyp" and data[8:12] not in IMAGE_BRANDS)
        or data[:4] == b"\x1aE\xdf\xa3"
        or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
    )


def decode_image(data: bytes, *, param: str, keep_side: int = 0) -> Image.Image:
    """Bytes -> RGB image, refusing unknown formats and decompression bombs before decoding.
    keep_side: a JPEG may be decoded smaller (decoded_size) while both its sides keep it."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            width, height = probe.size
            if width * height > MAX_DECODED_PIXELS:
                raise _too_large(param, f"{width}x{height}")
            if decode_cost(width, height) > MAX_DECODE_BYTES:
                raise MediaError(
                    f"The image at {param} is {width}x{height}: too long and thin to decode "
                    f"here (its rows would take more memory than an image of the server's "
                    f"limit, {MAX_DECODED_PIXELS} pixels).",
                    param=param,
                    code="image_too_large",
                )
            if keep_side and probe.format in ("JPEG", "MPO"):  # (MPO: a JPEG's kind)
                probe.draft("RGB", (keep_side, keep_side))
            probe.load()
            image = _rgb(ImageOps.exif_transpose(probe))
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(param, bomb_size(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise not_an_image(param, data[:64]) from None
    if min(image.size) < 1:
        raise MediaError(f"The image at {param} is empty.", param=param)
    return image


# Image formats read elsewhere but not here, by their first bytes (HEIF/AVIF: the ftyp box).
OTHER_IMAGE_SIGNATURES = (
    (b"II*\x00", "a TIFF"),
    (b"MM\x00*", "a TIFF"),
    (b"\x00\x00\x01\x00", "an ICO"),
    (b"\xff\x0a", "a JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL"),
)


def other_image_format(head: bytes) -> str | None:
    """An image format read elsewhere but not here, by a file's first bytes ("an AVIF
    image"); None for anything else."""
    if head[4:8] == b"ftyp" and head[8:12] in IMAGE_BRANDS:
        return f"{'an AVIF' if head[8:11] == b'avi' else 'a HEIF'} image"
    for signature, name in OTHER_IMAGE_SIGNATURES:
        if head.startswith(signature):
            return f"{name} image"
    if head.lstrip()[:5].lower() in (b"<svg ", b"<?xml"):
        return "an SVG (or other XML) file"
    return None


def judged_kind(head: bytes, param: str) -> Literal["image", "video", "neither"]:
    """What downloaded bytes are by their first bytes: an image read here, a video, or
    neither (read as a video: its error then names both). An image format read elsewhere is
    its 400 at once (an AVIF was read as a video: "the video has no decodable frames")."""
    if looks_like_image(head):
        return "image"
    if other_image_format(head) is not None:
        raise not_an_image(param, head)
    return "video" if looks_like_video(head) else "neither"


# Where a video sent as an image goes (chat's video_url part; /v1/messages words it its way).
VIDEO_PART_HINT = "; send it as a video_url part"
VIDEO_HINT = (
    "; it is a video: send it as a video_url part, or as a data: URI that declares it "
    "(data:video/mp4;base64,...)"
)


def not_an_image(param: str, head: bytes) -> MediaError:
    """The 400 for bytes that are no image this server reads, saying what they are where
    that helps: another image format, by name; a video, with how to send one."""
    if (other := other_image_format(head[:32])) is not None:
        hint = f"; it is {other}, not one of those"
    elif looks_like_video(head):
        hint = VIDEO_HINT
    else:
        hint = ""
    return MediaError(
        f"The data at {param} is not a valid image (supported: {IMAGE_FORMATS}){hint}.",
        param=param,
    )


def _rgb(image: Image.Image) -> Image.Image:
    """As the model sees it: transparency over white (as qwen-vl-utils reads an image: black,
    Pillow's, hid dark text on a transparent background), 16-bit gray scaled to 8 bits
    (Pillow's conversion clips it: mid-gray became white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # (PNG's: 0..65535)
        levels = (np.asarray(image) >> 8).astype(np.uint8)  # (one copy a step, no wider)
        return Image.fromarray(levels, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return image.convert("RGB")


def fit_to_budget(
    image: Image.Image,
    max_pixels: int,
    *,
    side: int = TOKEN_SIDE,
    min_pixels: int = 0,
    full_size: tuple[int, int] | None = None,
) -> Image.Image:
    """full_size: the image's size before a draft decode shrank it (its target is that's)."""
    full = full_size or image.size
    size = target_size(*full, max_pixels, side, min_pixels)
    if (padded := padded_size(*full)) != full:
        # The strip scaled as its padded image would be, centred on a black canvas of the
        # target size (never the padded image itself: a 1,000,000x64 strip padded first
        # would be 5 billion pixels).
        scale = min(size[0] / padded[0], size[1] / padded[1])  # (one: the strip undistorted)
        inner = [max(1, round(n * scale)) for n in full]
        canvas = Image.new(image.mode, size)
        # Reduced by whole factors first (box sums, no weights): a bicubic resize precomputes
        # weights for every source pixel along the long side, 2 GB for a 1x67,108,864 PNG
        # (Pillow's MemoryError: a 500), 1.7 GB for 1x40,000,000; within 3x of the target,
        # bicubic then, which Pillow says cannot be told from a straight one.
        strip = image.resize(tuple(inner), Image.Resampling.BICUBIC, reducing_gap=3.0)
        canvas.paste(strip, ((size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2))
        return canvas
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def load_image(
    data: bytes, pixels: tuple[int, int], *, param: str, side: int = TOKEN_SIDE
) -> Image.Image:
    """Blocking: call it from a worker thread. pixels: the (min, max) pixels it is resized
    into (pixel_range's, the same the token estimate before decoding uses); side: pixels along
    a visual token's side."""
    min_pixels, max_pixels = pixels
    size = header_size(data)
    keep_side = jpeg_draft_side(size, pixels, side) if size is not None else 0
    image = decode_image(data, param=param, keep_side=keep_side)
    full = _full_size(size, image.size) if size is not None else None
    return fit_to_budget(image, max_pixels, side=side, min_pixels=min_pixels, full_size=full)
