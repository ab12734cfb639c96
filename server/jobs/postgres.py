"""The shared job store: PostgreSQL (psycopg 3 with a connection pool), for several replicas.

Claims take the oldest claimable row with FOR UPDATE SKIP LOCKED, so replicas never wait on
each other's claims nor claim the same job; a queued job is announced with NOTIFY, so idle
replicas wake at once instead of at their next poll. Times are the database's clock (each
process measures its offset at start), so leases do not depend on the replicas' clocks agreeing.
The schema is created and migrated at start under an advisory lock: replicas may start together.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from server.exceptions import InvalidRequest, JobStoreStartError, JobStoreUnavailable
from server.jobs.store import Execute, JobStore

logger = logging.getLogger(__name__)

CHANNEL = "vlm_jobs"
POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_S = 5
WAIT_FOR_CONNECTION_S = 3.0  # then a request that needs the store is a 503
OUTAGE_WAIT_S = 0.2  # the same while the store is known not to answer
LISTEN_RECONNECT_S = 2.0
RECONNECT_MAX_DELAY_S = 1.0  # between the pool's attempts to connect again after an outage

MIGRATIONS = [
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        request TEXT NOT NULL,
        status TEXT NOT NULL,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        result TEXT,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempt INTEGER NOT NULL DEFAULT 0,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT,
        owner TEXT,
        webhook_url TEXT
    );
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE shared_values (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE INDEX jobs_by_status ON jobs (status, created_at);
    CREATE INDEX jobs_claimable ON jobs (created_at) WHERE status IN ('queued', 'processing');
    CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_of_job ON deliveries (job_id)
    """,
    """
    ALTER TABLE jobs ADD COLUMN description TEXT;
    CREATE TABLE files (
        id TEXT PRIMARY KEY,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        content BYTEA NOT NULL
    );
    CREATE INDEX files_by_time ON files (created_at, id)
    """,
    """
    CREATE TABLE batch_answers (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        status INTEGER NOT NULL,
        entry TEXT NOT NULL,
        PRIMARY KEY (batch_id, line)
    )
    """,
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        previous_response_id TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION NOT NULL,
        input TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX responses_by_use ON responses (used_at);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        created_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION NOT NULL,
        metadata TEXT NOT NULL
    );
    CREATE TABLE conversation_items (
        conversation_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        id TEXT NOT NULL,
        item TEXT NOT NULL,
        PRIMARY KEY (conversation_id, position)
    );
    CREATE INDEX conversations_by_use ON conversations (used_at)
    """,
    """
    CREATE TABLE response_events (
        response_id TEXT NOT NULL,
        sequence_number INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        event TEXT NOT NULL,
        PRIMARY KEY (response_id, sequence_number)
    )
    """,
    # whose each row is (server/jobs/project.py; '': every project's, as before)
    """
    ALTER TABLE jobs ADD COLUMN project TEXT NOT NULL DEFAULT '';
    ALTER TABLE files ADD COLUMN project TEXT NOT NULL DEFAULT '';
    ALTER TABLE responses ADD COLUMN project TEXT NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN project TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_by_project ON jobs (project, created_at);
    CREATE INDEX files_by_project ON files (project, created_at)
    """,
    # jobs' takeovers (Job.takeovers)
    "ALTER TABLE jobs ADD COLUMN takeovers INTEGER NOT NULL DEFAULT 0",
]


class _SteadyBackoff(AttemptWithBackoff):
    """psycopg_pool's reconnect attempts double their delay (1, 2, 4... s): the pool came
    back 20 s after a 45 s outage had ended (every request a 503 meanwhile). Here they
    double up to RECONNECT_MAX_DELAY_S (the database sees one connection attempt a second)."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX_DELAY_S)


class _Pool(ConnectionPool):
    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        attempt = attempt or _SteadyBackoff(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)


class PostgresJobStore(JobStore):
    greatest = "GREATEST"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    for_update = " FOR UPDATE"

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        reason = _first_connection(url)  # (None: it connected)
        self.connection_errors = 0  # the pool's failed connection attempts, as last seen
        self.pool = _Pool(
            url,
            min_size=1,
            max_size=POOL_MAX_SIZE,
            # prepare_threshold None: no statement is prepared. psycopg prepares one run five
            # times on a connection, and a prepared `RETURNING *` fails once a newer replica's
            # migration adds a column ("cached plan must not change result type"): each
            # connection's next claim failed in a rolling upgrade. (Its saving here is small:
            # these are short statements on an indexed table.)
            kwargs={"row_factory": dict_row, "prepare_threshold": None, **connection_kwargs(url)},
            check=ConnectionPool.check_connection,  # a connection the database dropped
            timeout=WAIT_FOR_CONNECTION_S,
            open=False,
        )
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
        except psycopg.OperationalError:
            self.pool.close()
            raise JobStoreStartError(
                f"--job-store: cannot connect to the database at {where(url)}: "
                f"{reason or 'no answer'} (is it running, and are the host, port, user and "
                "database right?)"
            ) from None
        self.clock_offset_s = 0.0
        self.stopping = threading.Event()
        self.listener: threading.Thread | None = None
        try:
            self._migrate()
        except psycopg.errors.InvalidSchemaName:
            self.pool.close()
            raise JobStoreStartError(
                f"--job-store: the database at {where(url)} has no schema to create the job "
                "store's tables in: create the schema its search_path names first (CREATE "
                "SCHEMA ...)"
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            self.pool.close()
            raise JobStoreStartError(
                f"--job-store: the database user may not create the job store's tables at "
                f"{where(url)} ({str(exc).strip().splitlines()[0]})"
            ) from None
        self._measure_clock()

    def close(self) -> None:
        self.stopping.set()
        if self.listener is not None:
            self.listener.join(timeout=5)
        self.pool.close()

    def now(self) -> float:
        return time.time() + self.clock_offset_s

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Execute]:
        def execute(sql: str, values: tuple) -> psycopg.Cursor:
            _refuse_nul(values)
            return connection.execute(_placeholders(sql), values)

        # While the store is known not to answer, a request for a connection gives up at once
        # rather than after the full wait: the routes that need it are 503s without a 3 s
        # stall each, a response not stored is not held up, nor is a scrape (the pool goes
        # on reconnecting meanwhile, and the job worker's polls find when it is back).
        wait = WAIT_FOR_CONNECTION_S if self.unreachable_since is None else OUTAGE_WAIT_S
        try:
            with self.pool.connection(timeout=wait) as connection, connection.transaction():
                yield execute
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if self._connection_lost(exc):
                self.answered(False)
            raise JobStoreUnavailable() from exc
        self.answered(True)

    def _connection_lost(self, exc: Exception) -> bool:
        """Whether the error says the database cannot be reached, not that it is busy: only
        that makes the store unreachable for /health and the short waits. A connection that
        broke or could not be made has no SQLSTATE, or class 08 (a cancelled statement, a
        lost deadlock do not); a pool timeout is one when the pool's own connection attempts
        have been failing since the last (all its connections in use times out too)."""
        if isinstance(exc, PoolTimeout):
            errors = self.pool.get_stats().get("connections_errors", 0)
            failing, self.connection_errors = errors > self.connection_errors, errors
            return failing  # (False leaves it as it was: down stays down until one answers)
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith("08")

    def _try_lock(self, execute: Execute, name: str) -> bool:
        row = execute("SELECT pg_try_advisory_xact_lock(hashtext(?)) AS held", (name,))
        return row.fetchone()["held"]

    def _hold(self, execute: Execute, name: str) -> None:
        execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,)).fetchone()

    def _announce(self, execute: Execute) -> None:
        execute(f"NOTIFY {CHANNEL}", ())

    def _migrate(self) -> None:
        with self.transaction() as execute:
            execute("SELECT pg_advisory_xact_lock(hashtext('vlm-server schema'))", ())
            execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", ())
            row = execute("SELECT MAX(version) AS version FROM schema_version", ()).fetchone()
            current = row["version"] or 0
            for version, script in enumerate(MIGRATIONS, start=1):
                if version > current:
                    for statement in script.split(";"):
                        execute(statement, ())
                    execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    logger.info("job store schema migrated to version %d", version)

    def _measure_clock(self) -> None:
        """Offset of the database's clock from ours, halfway through the round trip."""
        with self.transaction(write=False) as execute:
            before = time.time()
            row = execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS t", ())
            database = row.fetchone()["t"]
            after = time.time()
        self.clock_offset_s = database - (before + after) / 2

    def watch(self, on_new_job: Callable[[], None]) -> None:
        self.listener = threading.Thread(
            target=self._listen, args=(on_new_job,), name="job-store-listen", daemon=True
        )
        self.listener.start()

    def _listen(self, on_new_job: Callable[[], None]) -> None:
        """LISTEN on a connection of its own (a pooled one would hand it back); reconnects
        for as long as the store is open."""
        failures = 0  # in a row: logged once per outage, then every few minutes
        while not self.stopping.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, **connection_kwargs(self.url)
                ) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        logger.info("job store: listening for new jobs again")
                    failures = 0
                    on_new_job()  # whatever was queued while not listening
                    while not self.stopping.is_set():
                        for _ in connection.notifies(timeout=1.0):
                            on_new_job()
            except RuntimeError:  # the event loop it wakes has closed: the server has stopped
                return
            except psycopg.Error:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    logger.warning("job store: listening for new jobs failed; reconnecting")
                self.stopping.wait(LISTEN_RECONNECT_S)


APPLICATION_NAME = "vlm-server"


# What every connection is given unless the URL says otherwise: the name a DBA sees in
# pg_stat_activity, and how soon a connection whose database stopped answering (a network
# partition, a host gone) is given up: data unacknowledged for 15 s, or an idle connection
# unanswered for 10 + 3 x 5 s. Without them a request on such a connection waited for the
# kernel's own timeouts (many minutes), not the 503 its client is promised.
CONNECTION_DEFAULTS: dict[str, object] = {
    "application_name": APPLICATION_NAME,
    "tcp_user_timeout": 15_000,  # (milliseconds)
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def connection_kwargs(url: str) -> dict[str, object]:
    """Every connection's: a timeout, and CONNECTION_DEFAULTS the URL does not give."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.Error:  # (a URL that cannot be read: the connection says why)
        given = dict(CONNECTION_DEFAULTS)
    defaults = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in given}
    return {"connect_timeout": CONNECT_TIMEOUT_S, **defaults}


def _first_connection(url: str) -> str | None:
    """One connection before the pool's: None when it connects; else why not, in PostgreSQL's
    words (said once the pool's retries are over: a database or role an init job is about
    to create may be there by then). A URL the client cannot read is one line at once (no
    wait mends it), without the password it may quote."""
    try:
        psycopg.connect(url, **connection_kwargs(url)).close()
    except psycopg.Error as exc:
        text = (str(exc).splitlines() or [""])[0]
        # the server's own words (FATAL: ...), or the client's last (... failed: Connection
        # refused)
        reason = " ".join(text.split("FATAL:")[-1].split("failed: ")[-1].split())
        if password := conninfo_password(url):  # as a whole word: a password "p" is not
            # every p of the message (postgresql://...)
            reason = re.sub(rf"(?<!\w){re.escape(password)}(?!\w)", "***", reason)
        # (a host name that does not resolve yet, a service DNS adds when it is up, is a
        # connection that failed: waited for, as one refused)
        if not text.startswith(("connection failed", "failed to resolve host")):
            reason = reason.removeprefix("connection is bad: ")
            raise JobStoreStartError(f"--job-store: cannot read the URL: {reason}") from None
        return reason
    return None


def conninfo_password(url: str) -> str | None:
    """The password written in a postgresql:// URL (raw, as a message would quote it)."""
    match = re.match(r"^[a-z]+://[^:/@]*:([^@]*)@", url)
    return match.group(1) if match and match.group(1) else None


def where(url: str) -> str:
    """host:port/dbname of a connection URL, without its password."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable URL)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _refuse_nul(values: tuple) -> None:
    """PostgreSQL text cannot hold NUL; a value from a client with one (an id in a URL, a webhook
    URL) is that client's mistake: a 400, as SQLite (which stores it) would answer 404 or 400."""
    if any(isinstance(value, str) and "\x00" in value for value in values):
        raise InvalidRequest(
            "The request contains a NUL character (\\u0000) where text is expected.",
            code="invalid_value",
        )


def _placeholders(sql: str) -> str:
    """The shared SQL's ? placeholders in psycopg's style."""
    return sql.replace("?", "%s")
