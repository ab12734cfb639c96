"""One response's turn in a conversation: it reads the conversation's items, runs, and adds its
own; two at once would each read a history without the other's turn, then both add theirs (a
history neither saw). So a response holds the conversation's lock for its turn (a lease in the
job store, which every replica sharing it sees, renewed while the turn runs): a request that
finds it held waits a moment (a turn just ending releases it), then is OpenAI's 400
`conversation_locked`; a background response waits its turn.
"""

from __future__ import annotations

import asyncio
import logging
import time

from server.exceptions import ConversationLocked, ConversationNotFound
from server.jobs.conversations import ConversationStore

logger = logging.getLogger(__name__)

LEASE_S = 30.0  # a holder that died (its server stopped) holds the conversation this long
WAIT_S = 2.0  # how long a request waits for a turn to end before its 400
POLL_S = 0.05


class ConversationLock:
    """take() it, then release() (awaited, where the turn ended well) or release_soon()."""

    def __init__(
        self,
        store: ConversationStore,
        conversation_id: str,
        holder: str,
        project: str,
        param: str = "conversation",
    ):
        self.store = store
        self.conversation_id = conversation_id
        self.holder = holder  # unique per turn: a response's id, a background attempt's own
        self.project = project
        self.param = param  # where the request names the conversation (its errors')
        self.held = False
        self._renewing: asyncio.Task[None] | None = None

    async def take(self, wait: bool = False) -> None:
        """Held (and renewed) from here on; or ConversationLocked once WAIT_S has passed
        (wait: no limit, for the server's own requests, which queue for their turn)."""
        deadline = None if wait else time.monotonic() + WAIT_S
        while not await self._try():
            if deadline is not None and time.monotonic() >= deadline:
                raise ConversationLocked(self.param)
            await asyncio.sleep(POLL_S if deadline is not None else 10 * POLL_S)
        self.held = True
        self.renew()

    def renew(self) -> None:
        """Renewed while this task runs: a stream's body renews it, once it starts (one that
        never starts, its client gone, leaves the lease to run out)."""
        self.pause()
        self._renewing = asyncio.create_task(self._renew())

    def pause(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def release(self) -> None:
        """Awaited where the turn ended (its items added): the next may start at once."""
        if self._let_go():
            await asyncio.to_thread(self._unlock)

    def release_soon(self) -> None:
        """Without awaiting (a task being cancelled): the release runs on a thread."""
        if self._let_go():
            asyncio.get_running_loop().run_in_executor(None, self._unlock)

    def _let_go(self) -> bool:
        """False when not held (never taken, or released already)."""
        self.pause()
        held, self.held = self.held, False
        return held

    async def _try(self) -> bool:
        taken = await asyncio.to_thread(
            self.store.lock_conversation, self.conversation_id, self.project, self.holder, LEASE_S
        )
        if taken is None:
            raise ConversationNotFound(self.conversation_id, param=self.param)
        return taken

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            try:
                renewed = await asyncio.to_thread(
                    self.store.renew_conversation_lock, self.conversation_id, self.holder, LEASE_S
                )
                if not renewed:
                    logger.warning("conversation %s: its lock was lost", self.conversation_id)
            except Exception as exc:  # (the store away a moment: the next renewal may do)
                logger.warning("conversation %s: lock not renewed: %s", self.conversation_id, exc)

    def _unlock(self) -> None:
        try:
            self.store.unlock_conversation(self.conversation_id, self.holder)
        except Exception:  # (its lease runs out instead)
            logger.exception("conversation %s: lock not released", self.conversation_id)
