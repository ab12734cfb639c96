"""Pixel budgets (pure math) and safe decoding."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from server.exceptions import MediaError
from server.media.image import (
    AUTO_DETAIL_MAX_PIXELS,
    LOW_DETAIL_MAX_PIXELS,
    MIN_PIXELS,
    decode_image,
    decoded_bytes,
    decoded_size,
    header_size,
    jpeg_draft_side,
    load_image,
    max_pixels_for,
    pixel_range,
    target_size,
)
from tests.helpers import make_image, make_video

MODEL_MAX = 16384 * 28 * 28
# pixel_range's arguments after detail for an image part that asks for no range of its own
UNASKED = (MODEL_MAX, 28, 0, (None, None))
AUTO = pixel_range("auto", *UNASKED)
SIZES = [1, 2, 27, 28, 29, 55, 56, 100, 224, 333, 480, 640, 1000, 1920, 4000, 8000]


@pytest.mark.parametrize("detail", ["low", "auto", "high"])
def test_target_size_invariants(detail: str) -> None:
    budget = max_pixels_for(detail, MODEL_MAX)
    for width, height in itertools.product(SIZES, SIZES):
        if max(width, height) / min(width, height) > 200:
            continue
        new_w, new_h = target_size(width, height, budget)
        assert new_w % 28 == 0 and new_h % 28 == 0
        assert new_w * new_h <= max(budget, 28 * 28)
        assert new_w * new_h >= MIN_PIXELS
        rounded_w, rounded_h = round(width / 28) * 28, round(height / 28) * 28
        if MIN_PIXELS <= rounded_w * rounded_h <= budget:
            # Within budget: only rounding to the 28-grid, never a real rescale.
            assert (new_w, new_h) == (rounded_w, rounded_h)


@pytest.mark.parametrize("side", [28, 32])
def test_a_min_pixels_at_the_ceiling_never_passes_it(side: int) -> None:
    """Enlarged to min_pixels, the sides are rounded up: with min_pixels at max_pixels (a
    request asking for the model's whole ceiling) that passed it (640x480 on Qwen3-VL: 16,428
    tokens of a 16,384 ceiling); shrunk back under it as the model's processor would."""
    ceiling = 16384 * side * side
    for width, height in itertools.product(SIZES, SIZES):
        if max(width, height) / min(width, height) > 200:
            continue
        new_w, new_h = target_size(width, height, ceiling, side, min_pixels=ceiling)
        assert new_w % side == 0 and new_h % side == 0
        assert new_w * new_h <= ceiling


def test_detail_budgets() -> None:
    assert max_pixels_for("low", MODEL_MAX) == LOW_DETAIL_MAX_PIXELS == 256 * 28 * 28
    assert max_pixels_for("auto", MODEL_MAX) == AUTO_DETAIL_MAX_PIXELS == 1280 * 28 * 28
    assert max_pixels_for("high", MODEL_MAX) == MODEL_MAX
    assert max_pixels_for("auto", 100 * 28 * 28) == 100 * 28 * 28  # never above the model's
    # --auto-image-tokens: auto's budget; 0 is the model's ceiling (vLLM's reading)
    assert max_pixels_for("auto", MODEL_MAX, auto_tokens=4096) == 4096 * 28 * 28
    assert max_pixels_for("auto", MODEL_MAX, auto_tokens=0) == MODEL_MAX
    assert max_pixels_for("auto", MODEL_MAX, auto_tokens=1) == 4 * 28 * 28  # the least image
    assert max_pixels_for("low", MODEL_MAX, auto_tokens=0) == LOW_DETAIL_MAX_PIXELS


def test_an_extreme_aspect_ratio_is_padded_to_200_to_1() -> None:
    """Qwen's resize refuses past 200:1; such a strip (hosted APIs read it) is padded with
    black bands to that ratio, and counted as the padded image."""
    image = load_image(make_image(3000, 10, fmt="PNG"), AUTO, param="p")
    assert image.width / image.height <= 200 and image.width % 28 == image.height % 28 == 0
    assert (image.width, image.height) == target_size(3000, 10, max_pixels_for("auto", MODEL_MAX))
    tall = load_image(make_image(10, 2010, fmt="PNG"), AUTO, param="p")
    assert tall.height > tall.width
    # never past 200:1 after the rounding to the token side either (19900x100 was 14112x56,
    # which the processor's own resize refused: a 500), and counted as decoded
    for width, height in ((6000, 1), (8000, 39), (1, 100_000), (19900, 100)):
        size = target_size(width, height, max_pixels_for("auto", MODEL_MAX))
        assert max(size) <= 200 * min(size) and size[0] % 28 == size[1] % 28 == 0, size


def test_load_image_sizes_to_budget() -> None:
    image = load_image(make_image(1920, 1080), pixel_range("low", *UNASKED), param="p")
    assert image.mode == "RGB"
    assert image.width * image.height <= LOW_DETAIL_MAX_PIXELS
    assert image.width % 28 == 0 and image.height % 28 == 0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_supported_formats(fmt: str) -> None:
    assert decode_image(make_image(64, 48, fmt=fmt), param="p").size == (64, 48)


def test_unsupported_format_is_refused() -> None:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF")
    with pytest.raises(MediaError, match="not a valid image"):
        decode_image(out.getvalue(), param="p")


@pytest.mark.parametrize(("container", "codec"), [("mp4", "libx264"), ("webm", "libvpx")])
def test_a_video_sent_as_an_image_is_told_to_be_a_video_url(container: str, codec: str) -> None:
    with pytest.raises(MediaError, match="it is a video: send it as a video_url part"):
        decode_image(make_video(0.5, container=container, codec=codec), param="p")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"  # (an iPhone's photo, unread)
    for not_a_video in (b"\x00" * 64, heic):
        with pytest.raises(MediaError) as info:
            decode_image(not_a_video, param="p")
        assert "video" not in info.value.message


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) body: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_decompression_bomb_refused_from_header() -> None:
    with pytest.raises(MediaError) as info:
        decode_image(png_header_only(50_000, 50_000), param="messages[0].content[0]")
    assert info.value.code in ("image_too_large", "invalid_media")
    assert "messages[0].content[0]" in info.value.message
    with pytest.raises(MediaError) as info:  # Pillow's own check (a JPEG): its size said too
        decode_image(png_header_only(12_000, 12_000), param="p")
    assert info.value.code == "image_too_large"
    assert "144000000 pixels" in info.value.message, info.value.message


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, b"GIF89a", make_image()[:200]])
def test_garbage_and_truncated(data: bytes) -> None:
    with pytest.raises(MediaError):
        decode_image(data, param="p")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    """Pillow's own conversion clips 16-bit levels: mid-gray came out white."""
    import numpy as np

    gradient = np.linspace(0, 65535, 256 * 4, dtype=np.uint16).reshape(4, 256)
    for levels in (np.full((8, 8), 32768, np.uint16), gradient):
        decoded = np.asarray(decode_image(_png(Image.fromarray(levels)), param="p"))
        assert decoded.shape[2] == 3
        assert abs(int(decoded[..., 0].mean()) - int(levels.mean()) // 257) <= 1


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_read_over_white(mode: str) -> None:
    """Black text on a transparent background: over black (Pillow's) it was all black."""
    from PIL import ImageDraw

    image = Image.new("RGBA", (60, 20), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle((10, 5, 30, 15), fill=(0, 0, 0, 255))
    if mode == "P":
        image = image.convert("P")  # (its transparency as a palette entry)
    elif mode == "LA":
        image = image.convert("LA")
    decoded = decode_image(_png(image), param="p")
    assert decoded.mode == "RGB"
    assert decoded.getpixel((2, 2)) == (255, 255, 255)
    assert decoded.getpixel((20, 10)) == (0, 0, 0)


def _photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """Smooth content (a gradient with a few shapes): what a photo's JPEG holds."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width // 2, height // 2), "red")
    out = io.BytesIO()
    image.save(out, fmt, quality=90)
    return out.getvalue()


def test_a_large_jpeg_is_decoded_at_the_scale_its_target_needs() -> None:
    """A JPEG many times its target is decoded at 1/2, 1/4 or 1/8 scale (its decode budget
    reckoned at that size, decoded_size), then resized to the same target as before, and
    looks as the full decode resized does; PNGs and JPEGs near their target are decoded
    whole."""
    data = _photo(4000, 3000)
    size = header_size(data)
    assert decoded_size(data, size, AUTO, 28) == (2000, 1500)
    low = pixel_range("low", *UNASKED)
    assert decoded_size(data, size, low, 28) == (1000, 750)
    keep = jpeg_draft_side(size, low, 28)
    assert decode_image(data, param="p", keep_side=keep).size == (1000, 750)
    drafted = np.asarray(load_image(data, low, param="p"), dtype=np.float32)
    whole = decode_image(data, param="p").resize(drafted.shape[1::-1], Image.Resampling.BICUBIC)
    assert drafted.shape[:2] == (target_size(4000, 3000, low[1])[::-1])
    assert np.abs(drafted - np.asarray(whole, dtype=np.float32)).mean() < 2.0
    png = _photo(4000, 3000, "PNG")
    assert decoded_size(png, header_size(png), low, 28) == (4000, 3000)
    near = _photo(640, 480)
    assert decoded_size(near, header_size(near), AUTO, 28) == (640, 480)
    assert decoded_bytes(decoded_size(data, size, low, 28)) * 15 < decoded_bytes(size)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "an AVIF image"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "a HEIF image"),
        (b"II*\x00" + bytes(64), "a TIFF image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', "an SVG"),
        (make_video(0.5), "data:video/mp4;base64"),
    ],
)
def test_bytes_that_are_not_a_readable_image_are_named(data: bytes, said: str) -> None:
    """An image format read elsewhere is named (an AVIF was "not a valid image", and on /v2
    judged a video); a video says how to send one, on every route."""
    with pytest.raises(MediaError) as info:
        decode_image(data, param="p")
    assert said in info.value.message, info.value.message


def test_a_huge_jpeg_frame_is_too_large_not_unreadable() -> None:
    """vLLM's frames-as-JPEGs video with a frame whose header says 65000x65000: too large
    (it was "not a JPEG": Pillow's bomb check fires while opening it)."""
    from server.media.image_frames import _open

    jpeg = bytearray(make_image(32, 32))
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)  # (height, width)
    with pytest.raises(MediaError) as info:
        _open(bytes(jpeg), "messages[0].content[0]")
    assert info.value.code == "media_too_large" and "4225000000 pixels" in info.value.message


def test_a_drafted_jpeg_keeps_the_target_of_its_full_size() -> None:
    """The draft's sides are rounded up (7356x2401 at 1/4 is 1839x601): the target is still
    reckoned from the full size, as before drafting (it moved by a token: 784x252 became
    756x252), turned as its EXIF orientation turns it."""
    low = pixel_range("low", *UNASKED)
    data = _photo(7356, 2401)
    assert load_image(data, low, param="p").size == target_size(7356, 2401, low[1])
    turned = Image.open(io.BytesIO(data))
    exif = turned.getexif()
    exif[0x0112] = 6  # (turned 90 degrees for display)
    out = io.BytesIO()
    turned.save(out, "JPEG", quality=90, exif=exif.tobytes())
    assert load_image(out.getvalue(), low, param="p").size == target_size(2401, 7356, low[1])


def test_a_progressive_jpegs_decode_memory_is_reckoned_whole() -> None:
    """libjpeg keeps a progressive JPEG's coefficients at full size whatever the draft scale:
    its share of the decode memory is its whole size's."""
    image = Image.open(io.BytesIO(_photo(4000, 3000)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, progressive=True)
    progressive = out.getvalue()
    assert decoded_size(progressive, (4000, 3000), AUTO, 28) == (4000, 3000)
    assert decoded_size(_photo(4000, 3000), (4000, 3000), AUTO, 28) == (2000, 1500)


@pytest.mark.parametrize("height", [67_108_864, 40_000_000])
def test_a_strip_too_thin_to_decode_is_refused_before_decoding(height: int) -> None:
    """A 1 x 67,108,864 PNG (130 KB, within the pixel limit) took 2.6 GB to decode, by its
    rows, then Pillow's MemoryError in the resize: a 500; 1 x 40,000,000 took 1.7 GB."""
    buffer = io.BytesIO()
    Image.new("L", (1, height), 128).save(buffer, "PNG")
    with pytest.raises(MediaError, match="too long and thin") as refused:
        load_image(buffer.getvalue(), (0, 1_000_000), param="p")
    assert refused.value.code == "image_too_large"
    # a tall page, as a long screenshot is, decodes (its rows a few MB)
    buffer = io.BytesIO()
    Image.new("L", (2, 3_000_000), 200).save(buffer, "PNG")
    assert load_image(buffer.getvalue(), (0, 1_000_000), param="p").size[1] > 1
