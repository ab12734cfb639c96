"""What kind of media a URL names ("image" or "video"), where it says: a data: URI by its
declared type, another URL by its path's extension. Media whose URL says neither (a signed CDN
link, a local file named `clip`) are judged by their first bytes (media/image.py's
looks_like_image) once downloaded."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from server.exceptions import MediaError
from server.media.fetch import is_data_uri, undeclared_data_uri

MediaKind = Literal["image", "video"]

# (3GP and F4V are MP4's container: old phones' videos, Flash's later ones)
VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".3gp", ".3g2", ".f4v",
    ".ts", ".mts", ".m2ts", ".mpg", ".mpeg", ".vob", ".flv", ".wmv", ".asf", ".ogv", ".ogg",
}  # fmt: skip
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp"}
# Video containers this server does not read: refused as such, not taken for a broken image.
OTHER_VIDEO_EXTENSIONS = {".rm", ".rmvb"}


def url_kind(url: str, param: str) -> MediaKind | None:
    """ "image" or "video" where the URL says (a video container this server does not read is
    a 400 that says so); None where it does not."""
    if is_data_uri(url):
        # (the type only: lowercasing the whole URI copied 260 MB on the event loop)
        if undeclared_data_uri(url):
            return None  # (its bytes say: read as a download's are)
        return "video" if url[5:11].lower() == "video/" else "image"
    suffix = PurePosixPath(url.split("?")[0].split("#")[0]).suffix.lower()
    if suffix in OTHER_VIDEO_EXTENSIONS:
        supported = ", ".join(sorted(VIDEO_EXTENSIONS))
        raise MediaError(
            f"{suffix} videos are not supported; videos can be {supported}.",
            param=param,
            code="unsupported_media_type",
        )
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return "image" if suffix in IMAGE_EXTENSIONS else None
