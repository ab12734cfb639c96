"""The webhook secret every replica signs with: the flag's, else one kept in the job store (the
first replica's wins, on both backends), with a copy in each data dir; a secret an older version
generated into the data dir becomes the store's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from server.jobs.store import JobStore
from server.jobs.webhooks import SECRET_PREFIX, load_or_create_secret


def test_replicas_share_the_stored_secret(open_store: Callable[[], JobStore], tmp_path: Path):
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    secret = load_or_create_secret(None, open_store(), first_dir)
    assert secret.startswith(SECRET_PREFIX)
    assert load_or_create_secret(None, open_store(), second_dir) == secret
    assert (second_dir / "webhook_secret").read_text() == secret  # the operator's copy
    assert (second_dir / "webhook_secret").stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret("whsec_flag", open_store(), second_dir) == "whsec_flag"


def test_a_secret_given_by_flag_is_every_replicas_from_then_on(
    open_store: Callable[[], JobStore], tmp_path: Path
) -> None:
    """A rotation (the flag on a replica's restart): its data dir's copy is the new secret (the
    one to give receivers), and a replica started later without the flag signs with it too."""
    first_dir, later_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    later_dir.mkdir()
    old = load_or_create_secret(None, open_store(), first_dir)
    assert load_or_create_secret("whsec_bmV3", open_store(), first_dir) == "whsec_bmV3"
    assert (first_dir / "webhook_secret").read_text() == "whsec_bmV3"
    assert load_or_create_secret(None, open_store(), later_dir) == "whsec_bmV3" != old
    assert (later_dir / "webhook_secret").read_text() == "whsec_bmV3"


def test_a_secret_from_an_older_data_dir_is_kept(open_store: Callable[[], JobStore], tmp_path):
    (tmp_path / "webhook_secret").write_text("whsec_b2xk\n")
    assert load_or_create_secret(None, open_store(), tmp_path) == "whsec_b2xk"
    other = tmp_path / "other"
    other.mkdir()
    (other / "webhook_secret").write_text("whsec_c3RhbGU=")  # a replica's own, from before
    assert load_or_create_secret(None, open_store(), other) == "whsec_b2xk"
    assert (other / "webhook_secret").read_text() == "whsec_b2xk"


def test_the_sqlite_store_is_readable_by_its_owner_alone(tmp_path: Path) -> None:
    """It holds the stored secret and every project's data: 0600 (its WAL too), in a data dir
    the server makes 0700; a database an older version left 0644 is narrowed."""
    from server.jobs.sqlite import SqliteJobStore

    path = tmp_path / "data" / "jobs.sqlite3"
    store = SqliteJobStore(path)
    load_or_create_secret(None, store, tmp_path)  # a write: the WAL exists
    assert path.parent.stat().st_mode & 0o777 == 0o700
    for name in (path, path.with_name("jobs.sqlite3-wal")):
        assert name.stat().st_mode & 0o777 == 0o600, name
    store.close()
    path.chmod(0o644)
    SqliteJobStore(path).close()
    assert path.stat().st_mode & 0o777 == 0o600
