"""Each server spools downloads into a directory of its own: a server starting on the same data
dir removes what dead servers left behind, never a running server's files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from server.media.spool import Spool

HOLD = """
import sys, time
from pathlib import Path
from server.media.spool import Spool
spool = Spool(Path(sys.argv[1]))
(spool.dir / "video.mp4").write_bytes(b"x")
print(spool.dir, flush=True)
time.sleep(60)
"""


def hold_spool(root: Path) -> tuple[subprocess.Popen, Path]:
    """Another server process with a spooled file."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_running_servers_files_are_kept_and_a_dead_ones_removed(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    running, running_dir = hold_spool(root)
    dead, dead_dir = hold_spool(root)
    dead.kill()
    dead.wait()
    (root / "old-version-file.mp4").write_bytes(b"x")
    try:
        spool = Spool(root)
        assert (running_dir / "video.mp4").exists()  # its server is alive
        assert not dead_dir.exists() and not (root / "old-version-file.mp4").exists()
        assert spool.dir.is_dir() and spool.dir.parent == root
        spool.close()
        assert not spool.dir.exists()
    finally:
        running.kill()
        running.wait()


def test_a_directory_being_made_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    fresh, stale = root / "being-made", root / "stale"
    fresh.mkdir(parents=True)
    stale.mkdir()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    Spool(root).close()
    assert fresh.exists() and not stale.exists()


def test_spooled_videos_are_the_servers_alone(tmp_path: Path) -> None:
    """Requests' videos: the spool's directories are 0700 (their files are already 0600)."""
    spool = Spool(tmp_path / "spool")
    try:
        assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
        assert spool.dir.stat().st_mode & 0o777 == 0o700
    finally:
        spool.close()
