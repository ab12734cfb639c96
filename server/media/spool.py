"""Where a server writes downloaded videos: a directory of its own under DATA_DIR/spool, locked
(flock) for as long as the process lives. The kernel drops the lock when the process ends, even
by SIGKILL, so a server starting on the same data dir removes what crashed servers left behind
and never the files of a server that is still running (a second one started by mistake would
otherwise delete the videos the first is decoding, failing its jobs).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import suppress
from pathlib import Path

LOCK_NAME = ".lock"
CREATION_GRACE_S = 60.0  # a directory without its lock yet may be one another server is making


class Spool:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True, mode=0o700)  # (requests' videos: ours alone)
        for leftover in root.iterdir():
            _remove_if_abandoned(leftover)
        self.dir = root / uuid.uuid4().hex
        self.dir.mkdir(mode=0o700)
        self.lock = os.open(self.dir / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self.lock)


def _remove_if_abandoned(path: Path) -> None:
    if not path.is_dir():  # a file spooled by a version without per-server directories
        path.unlink(missing_ok=True)
        return
    try:
        lock = os.open(path / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        with suppress(FileNotFoundError):
            if time.time() - path.stat().st_mtime > CREATION_GRACE_S:
                shutil.rmtree(path, ignore_errors=True)
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # its server is running
    else:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(lock)
