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
