"""What a store of some of the job store's tables (files, responses, conversations) needs from
the backend it is mixed into (SqliteJobStore, PostgresJobStore)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager

from server.jobs.deliveries import Execute


class Tables(ABC):
    for_update = ""  # appended to a SELECT whose rows the transaction then holds (PostgreSQL)

    @abstractmethod
    def transaction(self, write: bool = True) -> AbstractContextManager[Execute]: ...

    @abstractmethod
    def now(self) -> float: ...

    def _hold(self, execute: Execute, name: str) -> None:
        """Inside a write transaction: wait for, then hold until it ends, the lock `name`, so
        that a check and the write it allows are one step (SQLite's write transactions are
        one at a time already)."""
        return None
