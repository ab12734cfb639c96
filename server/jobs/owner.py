"""Who holds a job's lease: `BOOT:PIDNS:PID:RANDOM`, unique per server process.

On start a server ends the leases of processes that are provably gone: same kernel boot and pid
namespace (so the pid means the same process), and no process with that pid. That is the case
after a crash and restart on one machine, where waiting out the lease would only delay the job.
Anything else (another machine, another container, a pid in use, no /proc) waits for the lease
to expire: a job is never taken from a process that may still be running it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def _scope() -> str | None:
    """This process's kernel boot and pid namespace; None where Linux's /proc cannot say."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}:{pid_namespace.removeprefix('pid:').strip('[]')}"


def new_owner() -> str:
    return f"{_scope() or 'unknown:unknown'}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def is_gone(owner: str) -> bool:
    """True only when `owner` was a process on this machine that no longer exists."""
    scope, _, rest = owner.rpartition(":")[0].rpartition(":")
    if scope != _scope() or not rest.isdigit():
        return False
    pid = int(rest)
    if pid == os.getpid():
        return False  # this pid is us, so the owner's process is not known to be gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user has that pid
        return False
    return False
