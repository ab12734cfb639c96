"""How a sequence's end becomes an answer or an error for the client."""

from __future__ import annotations

from server.engine.engine import RETRY_AFTER_S
from server.engine.sequence import SequenceOutput
from server.exceptions import EngineOverloaded, ServerError


class GenerationFailed(ServerError):
    def __init__(self) -> None:
        super().__init__("The model failed while generating; see the server log.")


def raise_for_finish(output: SequenceOutput) -> None:
    if output.finish_reason == "error":
        raise GenerationFailed()
    if output.finish_reason == "queue_timeout":
        raise EngineOverloaded(
            "The request waited too long for a free slot; retry shortly.",
            retry_after_s=RETRY_AFTER_S,
            code="queue_timeout",
        )
