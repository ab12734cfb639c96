"""Webhook deliveries (Standard Webhooks v1) for finished jobs.

Each delivery has a stable `webhook-id`; every attempt carries `webhook-timestamp` and
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` keyed with the `whsec_`
secret (--webhook-secret, else one generated once and kept in the job store, so every replica
signs with the same one; a copy is written to DATA_DIR/webhook_secret for the operator). With
--webhook-secret-per-project a job's deliveries are signed with its project's own secret,
derived from that one (`vlm-server webhook-secret --project NAME` prints it): a tenant's job
sent to another tenant's receiver then does not pass that receiver's signature check.
Failures, timeouts, 5xx and 429 are retried on the configured schedule with jitter (Retry-After
honoured, up to an hour); 410 stops; redirects are not followed. An attempt is its status alone
(the receiver's body is not read), within --webhook-timeout as a whole. Pending deliveries live
in the job store, so they survive restarts and whichever replica is alive sends them; a replica
holds a delivery while its attempt is in flight, so replicas do not send the same attempt side
by side.
Webhook URLs pass the same address check as media URLs (netguard).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import hmac
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter

from server import __version__
from server.exceptions import JobStoreUnavailable
from server.jobs.project import ALL
from server.jobs.store import JobStore
from server.jobs.worker import cancel_and_wait
from server.log import request_id_var
from server.media.netguard import (
    AddressRefused,
    HostUnresolved,
    check_url_statically,
    checked_request,
    default_port,
    resolve_checked,
)

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# How often the store is asked for due deliveries when nothing wakes the sender first: others'
# (a replica that died mid-attempt), redelivered ones, retries due after a restart. Deliveries
# this process queues, its retries and a backlog wake it at once (see wake).
POLL_S = 1.0
# An attempt's outcome not yet recorded is written again this soon once the store answers
# (then less often, up to each second, while writes still fail): another replica finding the
# delivery due meanwhile would send it a second time.
RECORD_RETRY_S = 0.2
MAX_IN_FLIGHT = 32
MAX_RETRY_AFTER_S = 3600.0  # a receiver's Retry-After is honoured up to an hour
FORGET_AFTER_S = 60.0
HOLD_MARGIN_S = 10.0
PROJECT_LABEL = b"vlm-server webhook secret of project\x00"


def load_or_create_secret(configured: str | None, store: JobStore, data_dir: Path) -> str:
    """The flag's secret, which then becomes the store's too (a rotation: a replica started
    later without the flag signs with it as well); else the store's, created once by the first
    process that asks (from the copy in the data dir, where one was generated before the store
    kept it). The data dir's copy is always the secret this process signs with."""
    path = data_dir / "webhook_secret"
    copy = path.read_text().strip() if path.exists() else None
    if configured:
        secret = configured
        if store.replace_shared_value("webhook_secret", configured) not in (None, configured):
            logger.warning(
                "--webhook-secret replaces the job store's webhook secret: every replica signs "
                "with it once restarted (receivers should accept both until then)"
            )
    else:
        generated = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()
        secret = store.shared_value("webhook_secret", copy or generated)
    if copy != secret:
        if copy is not None and not configured:
            logger.warning("%s differs from the shared webhook secret; replacing it", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # (0600 from the start)
        with os.fdopen(fd, "w") as copy_file:
            copy_file.write(secret)
        path.chmod(0o600)  # (a copy an older version wrote wider)
    return secret


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def project_secret(secret: str, project: str) -> str:
    """The secret that signs `project`'s webhooks: HMAC-SHA256 of the project's name keyed
    with the shared secret (one key to keep, rotated with it; a project's secret tells
    nothing of another's). Objects in no project (a server without keys) keep the shared one."""
    if project == ALL:
        return secret
    derived = hmac.new(_key(secret), PROJECT_LABEL + project.encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(derived).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    signed = f"{msg_id}.{timestamp}.{body}".encode()
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After as seconds or as an HTTP date, at most MAX_RETRY_AFTER_S; None when absent
    or unreadable. (A receiver's 400 nines were an infinite wait stored with the delivery, which
    then broke its project's job listing; a year-9999 date kept the job past its retention.)"""
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.replace(".", "", 1).isdigit():  # ("²" is a digit to Python)
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


RESOLVE_S = 5.0  # how long a submitted webhook URL's host is looked up for


class WebhookSender:
    def __init__(
        self,
        store: JobStore,
        secret: str,
        retry_delays_s: tuple[float, ...],
        timeout_s: float,
        allowed_hosts: tuple[str, ...],
        attempts_metric: Counter | None = None,
        per_project: bool = False,
    ):
        self.store = store
        self.attempts_metric = attempts_metric
        self.secret = secret
        self.per_project = per_project
        self.retry_delays_s = retry_delays_s
        self.timeout_s = timeout_s
        self.hold_s = timeout_s + HOLD_MARGIN_S  # an attempt's longest time in flight
        self.allowed_hosts = allowed_hosts
        self.client = httpx.AsyncClient(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
            headers={"User-Agent": f"vlm-server/{__version__} (webhooks)"},
        )
        self.task: asyncio.Task | None = None
        self.watcher: Callable[[], None] | None = None  # the store's call when it queues one
        # Attempts run side by side, so one slow receiver does not hold back the others.
        self.in_flight: dict[str, asyncio.Task] = {}
        # Attempts made per delivery, as this process recorded them: a row read just before an
        # attempt was recorded is stale, and must not start that attempt again.
        self.attempts_made: dict[str, int] = {}
        self.wakeup = asyncio.Event()
        self.backlogged = False  # the last poll found as many as it had room for
        self.draining = False  # the server stops: no attempt starts any more

    async def check_url(self, url: str) -> None:
        """Refuses now (AddressRefused) a URL no attempt could ever reach, rather than retrying
        it for the whole schedule: one the rules refuse as written, or a host that resolves to
        a private address (`localhost`, say). A host that does not resolve yet is accepted: DNS
        may answer by the time the job ends."""
        check_url_statically(url, self.allowed_hosts)
        parsed = httpx.URL(url)
        port = default_port(parsed)
        host = parsed.raw_host.decode("ascii")
        # A slow resolver does not hold the request: the delivery checks the address again.
        with contextlib.suppress(HostUnresolved, TimeoutError):
            await asyncio.wait_for(resolve_checked(host, port, self.allowed_hosts), RESOLVE_S)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.watcher = lambda: loop.call_soon_threadsafe(self.wake)
        self.store.watch_deliveries(self.watcher)
        self.task = asyncio.create_task(self._loop())

    def wake(self) -> None:
        """Asks the store for due deliveries now, not at the next poll (the event loop's
        thread only)."""
        self.wakeup.set()

    def drain(self) -> None:
        """No attempt starts from now on; those in flight go on (the server's drain waits for
        them, as for requests): one cut off would be sent again, a duplicate."""
        self.draining = True
        self.wake()

    async def stop(self) -> None:
        """Attempts cut short are not recorded: they are sent again once their hold lapses
        (hold_s), by another replica or the next start."""
        if self.watcher is not None:
            self.store.unwatch_deliveries(self.watcher)
        if self.in_flight:
            logger.warning(
                "%d webhook attempt(s) cut off by the stop: sent again in about %.0f s, by "
                "another replica or this server's next start (the same webhook-id: a "
                "receiver that got one sees it twice)",
                len(self.in_flight),
                self.hold_s,
            )
        tasks = [*self.in_flight.values(), *([self.task] if self.task else [])]
        await cancel_and_wait(tasks)
        await self.client.aclose()

    async def _loop(self) -> None:
        store_down = False
        while not self.draining:
            self.wakeup.clear()  # (before the query: a wake while it runs asks again)
            try:
                room = MAX_IN_FLIGHT - len(self.in_flight)
                due = await asyncio.to_thread(self.store.due_deliveries, room, self.hold_s)
                self.backlogged = len(due) >= room
                store_down = False
                for row in due:
                    if self._may_start(row):
                        self.in_flight[row["id"]] = asyncio.create_task(self._attempt(row))
            except JobStoreUnavailable:  # deliveries wait in the store; said once per outage
                if not store_down:
                    logger.warning("job store unreachable; webhooks wait for it")
                store_down = True
            except Exception:  # the sender must outlive any one delivery's trouble
                logger.exception("webhook sender step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), POLL_S)

    def _may_start(self, row) -> bool:
        """Not in flight here, nor a stale read of one this process attempted since (a
        delivery it gave up on and `redeliver-webhooks` queued again, attempts 0, waits out
        FORGET_AFTER_S here: another replica sends it at once)."""
        return (
            not self.draining  # (set while the query ran: the rows are due again later)
            and row["id"] not in self.in_flight
            and row["attempts"] >= self.attempts_made.get(row["id"], 0)
            and len(self.in_flight) < MAX_IN_FLIGHT
        )

    async def _attempt(self, row) -> None:
        try:
            await self._attempt_once(row)
        except Exception:
            logger.exception("webhook %s: attempt failed unexpectedly", row["id"])
        finally:
            self.in_flight.pop(row["id"], None)
            if self.backlogged:  # (room for one more of those waiting)
                self.wake()

    async def _attempt_once(self, row) -> None:
        request_id_var.set(row["job_id"])  # this task's log lines carry the job's id
        attempts = row["attempts"] + 1
        status_code, error, retry_after = None, None, None
        try:
            project = (row["project"] or ALL) if self.per_project else ALL  # (None: job gone)
            secret = project_secret(self.secret, project)
            status_code, retry_after = await self._post(secret, row)
        except AddressRefused as refused:
            error = str(refused)
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            # (the class alone, "ConnectError", did not say "connection refused")
            error = f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
        if status_code is not None and 200 <= status_code < 300:
            outcome, delay = "delivered", 0.0
        elif status_code == 410 or attempts > len(self.retry_delays_s):
            outcome, delay = "failed", 0.0
        else:
            delay = self.retry_delays_s[attempts - 1] * random.uniform(0.8, 1.2)
            if retry_after is not None and status_code in (429, 503):
                delay = max(delay, retry_after)
            outcome = "pending"
        said = "retrying" if outcome == "pending" else outcome  # the metric's word too
        logger.log(
            logging.WARNING if outcome == "failed" else logging.INFO,  # (given up: it is lost)
            "webhook %s attempt %d: %s (%s)%s",
            row["id"],
            attempts,
            said,
            status_code or error,
            f" in {delay:.1f} s" if outcome == "pending" else "",
        )
        if self.attempts_metric is not None:
            self.attempts_metric.labels(said).inc()
        await self._record(row["id"], attempts, outcome, delay, status_code, error)
        self.attempts_made[row["id"]] = attempts
        if outcome == "pending":  # (at its time, not at the next poll after it)
            asyncio.get_running_loop().call_later(delay, self.wake)
        else:  # no further attempt; forget it once no stale read can remain
            asyncio.get_running_loop().call_later(
                FORGET_AFTER_S, self.attempts_made.pop, row["id"], None
            )

    async def _record(self, delivery_id: str, *outcome: Any) -> None:
        """An attempt's outcome is not dropped for a store outage (the receiver may have the
        webhook: one the store still called pending went out again, and an ERROR line was
        logged): written once the store answers."""
        failures = 0
        while True:
            try:
                await asyncio.to_thread(self.store.record_attempt, delivery_id, *outcome)
                return
            except JobStoreUnavailable:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "webhook %s: job store unreachable; recording it when back", delivery_id
                    )
                # (soon once the store answers again: RECORD_RETRY_S)
                back = self.store.unreachable_since is None
                await asyncio.sleep(
                    min(RECORD_RETRY_S * 2**failures, 1) if back else min(failures, 5)
                )

    async def _post(self, secret: str, row: dict[str, Any]) -> tuple[int, float | None]:
        """One attempt: the receiver's status and Retry-After. The whole attempt has
        --webhook-timeout (httpx's timeout bounds each read, which a receiver that trickles a
        byte at a time resets, holding a slot for hours); the receiver's body is never read
        (one that answers with an endless body filled the memory)."""
        return await asyncio.wait_for(self._send(secret, row), self.timeout_s)

    async def _send(self, secret: str, row: dict[str, Any]) -> tuple[int, float | None]:
        msg_id, body = row["id"], row["payload"]
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
        }
        request = await checked_request(
            self.client,
            "POST",
            httpx.URL(row["url"]),
            self.allowed_hosts,
            headers=headers,
            content=body,
        )
        response = await self.client.send(request, stream=True)
        try:
            return response.status_code, retry_after_s(response)
        finally:
            await response.aclose()
