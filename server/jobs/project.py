"""Projects: whose stored objects (files, batches, jobs, responses, conversations) a request
sees. On a server with API keys each key belongs to a project (its own unless the operator
names one: keys of one project share their objects), and a request sees only its project's
objects: another project's are not found (404), as on OpenAI's platform, and are left out of
lists. Without keys every request is in project ALL, which sees everything; an object made
then (or before this server kept projects) is in ALL too and every key sees it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.jobs.deliveries import Execute

ALL = ""
# The tables whose rows have a project.
PROJECT_TABLES = ("jobs", "files", "responses", "conversations")

# The project of the request (set by the API key check) or job (set by the worker) this task
# serves: what a route, or media named by file id deep in a pipeline, may see.
project_var: ContextVar[str] = ContextVar("project", default=ALL)


def current_project() -> str:
    return project_var.get()


def sees(viewer: str, owner: str) -> bool:
    """VISIBLE in Python, for an object already read."""
    return viewer == ALL or owner in (ALL, viewer)


# The rows a project sees (the query passes `seen_by(project)` for its two placeholders).
VISIBLE = "(? = '' OR project IN ('', ?))"


def seen_by(project: str) -> tuple[str, str]:
    return project, project


def row_seen(execute: Execute, table: str, row_id: str, project: str) -> bool:
    """Whether the table has the row `row_id` and the project sees it."""
    query = f"SELECT id FROM {table} WHERE id = ? AND {VISIBLE}"
    return execute(query, (row_id, *seen_by(project))).fetchone() is not None


def visible(column_prefix: str) -> str:
    """VISIBLE for a table named by an alias (`r.`) in a join."""
    return VISIBLE.replace("project", f"{column_prefix}project")


@functools.cache  # (a slow hash: each key once)
def of_key(key: str) -> str:
    """A key's own project, when the operator names none: it stays the same as long as the key
    does (a key replaced by a new one is a new project, unless both are given one name). It is
    stored with every object: a slow hash, so that a copy of the database does not make a
    weak key quick to guess."""
    digest = hashlib.pbkdf2_hmac("sha256", key.encode(), b"vlm-server project", 20_000)
    return "key-" + digest[:8].hex()


class ProjectLabels:
    """How /metrics names a project: a named one by its name; a key's own (of_key: a slow hash
    of the key, the same on every server) by an HMAC of it keyed with the job store's own
    random secret, which nothing hands out (/metrics may be open: of_key itself would let a
    guess at a weak key be checked offline). Every replica of a store names it alike, and a
    key another replica was given is named so here too."""

    def __init__(self, secret: str, named: frozenset[str]):
        self.secret = secret.encode()
        self.named = named  # (a project named "key-x" keeps its name)

    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one per server, for its lifetime)
    def __call__(self, project: str) -> str:
        if project in self.named or not project.startswith("key-"):
            return project
        return "key-" + hmac.new(self.secret, project.encode(), "sha256").hexdigest()[:16]


def named_projects(keys: dict[str, str]) -> frozenset[str]:
    """The projects the operator named (not a key's own)."""
    return frozenset(project for key, project in keys.items() if project != of_key(key))


def scoped_key(project: str, idempotency_key: str | None) -> str | None:
    """An Idempotency-Key as stored: one project's key never finds another project's job.
    An empty key (a script's unset variable in the header) is no key: None."""
    idempotency_key = (idempotency_key or "").strip() or None
    if idempotency_key is None or project == ALL:
        return idempotency_key
    return f"{project}\x1f{idempotency_key}"
