"""Domain errors raised below the API layer; api/errors.py turns them into HTTP responses.

Messages are written for the client: they name what was wrong and never carry an
exception's text from a decoder, torch or the OS.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the API layer knows how to answer."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def rename_param(self, param: str | None) -> None:
        """The error in a translated body's words: its field's name, also where its message
        starts with the field (`response_format: ...` -> `text.format: ...`)."""
        if self.param and param and self.message.startswith(f"{self.param}:"):
            self.message = param + self.message[len(self.param) :]
        self.param = param


class InvalidRequest(ServerError):
    """The request is well-formed JSON but asks for something we cannot do (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class PromptTooLong(InvalidRequest):
    """A prompt past the model's context (context_length_exceeded), with its numbers: the APIs
    that word it their own way read them (Anthropic's clients look for "prompt is too long")."""

    def __init__(
        self,
        message: str,
        num_tokens: int,
        max_tokens: int,
        *,
        built: bool,
        param: str = "messages",
    ):
        super().__init__(message, param=param, code="context_length_exceeded")
        self.num_tokens = num_tokens  # the prompt's (where only its images were counted: theirs)
        self.max_tokens = max_tokens  # the most the prompt may be
        self.built = built  # found once the prompt was built (its media decoded), not before


class AnswerTooLong(PromptTooLong):
    """max_tokens that the prompt leaves no room for (Anthropic's clients look for "input
    length and `max_tokens` exceed context limit" to lower max_tokens and retry)."""

    def __init__(self, message: str, num_tokens: int, answer_tokens: int, context: int):
        super().__init__(message, num_tokens, context, built=True, param="max_tokens")
        self.answer_tokens = answer_tokens


# What to send instead of a refused field, where there is something.
UNSUPPORTED_HINTS = {
    "functions": ': send the functions as `tools` (each {"type": "function", "function": {...}})',
    "function_call": ": send `tool_choice` (with `tools`)",
    "audio": ": answers are text",
    "modalities": ": answers are text",
    # (never taken and ignored: a file its client asked to expire would be kept)
    "expires_after": ": uploaded files stay until deleted (DELETE /v1/files/{id}); upload "
    "without it",
}


def refuse_unsupported(fields: list[str], what: str = "") -> None:
    """An accepted-but-unsupported field is refused, naming it, never silently dropped."""
    if fields:
        raise InvalidRequest(
            f"`{fields[0]}`{what} is not supported by this server"
            f"{UNSUPPORTED_HINTS.get(fields[0], '')}.",
            param=fields[0],
            code="unsupported_parameter",
        )


class MediaError(InvalidRequest):
    """A media part could not be fetched or decoded (400)."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_media"):
        super().__init__(message, param=param, code=code)


class NotFound(ServerError):
    """What a request names by id (a model, job, file, batch, response, conversation) that
    is not here: a 404."""

    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )


class ModelNotDeletable(ServerError):
    """DELETE /v1/models/{model} (OpenAI's, for fine-tuned models) of a model served here."""

    status_code = 403
    error_type = "permission_error"

    def __init__(self, model: str):
        super().__init__(
            f"The model `{model}` is the model this server serves; it cannot be deleted "
            "through the API (stop the server to unload it).",
            param="model",
            code="model_not_deletable",
        )


class JobNotFound(NotFound):
    def __init__(self, job_id: str):
        super().__init__(f"No job `{job_id}`.", param="id", code="job_not_found")


class FileNotFound(NotFound):
    def __init__(self, file_id: str, param: str = "file_id"):
        super().__init__(f"No such File object: {file_id}", param=param, code="file_not_found")


class BatchNotFound(NotFound):
    def __init__(self, batch_id: str):
        super().__init__(
            f"No batch found with id '{batch_id}'.", param="batch_id", code="batch_not_found"
        )


class ChatCompletionNotFound(NotFound):
    """OpenAI's stored chat completions (store: true): this server keeps none."""

    def __init__(self, completion_id: str):
        super().__init__(
            f"No stored chat completion with id '{completion_id}': this server does not store "
            "chat completions (`store` is accepted and ignored); the Responses API stores "
            "what it answers.",
            param="completion_id",
            code="chat_completion_not_found",
        )


class BatchNotCancellable(ServerError):
    status_code = 409
    error_type = "invalid_request_error"

    def __init__(self, batch_id: str, status: str):
        super().__init__(
            f"Batch {batch_id} has already {status}; only a validating or in-progress batch "
            "can be cancelled.",
            param="batch_id",
            code="batch_not_cancellable",
        )


class ResponseNotFound(NotFound):
    """A stored response asked for by id (the Responses API) that is not stored."""

    noun, param, code = "Response", "response_id", "response_not_found"

    def __init__(self, response_id: str):
        super().__init__(
            f"{self.noun} with id '{response_id}' not found: it was not stored (store: "
            "false), was deleted, or is past the server's retention.",
            param=self.param,
            code=self.code,
        )


class ConversationLocked(InvalidRequest):
    """Another response is taking its turn in the conversation (OpenAI's 400)."""

    def __init__(self, param: str = "conversation") -> None:
        super().__init__(
            "Another process is currently operating on this conversation. Please retry in a "
            "few seconds.",
            param=param,
            code="conversation_locked",
        )


class ConversationNotFound(NotFound):
    """A conversation (the Conversations API), or an item of one, that is not stored."""

    def __init__(self, conversation_id: str, param: str = "conversation_id", item: str = ""):
        what = f"Item with id '{item}' in conversation" if item else "Conversation with id"
        super().__init__(
            f"{what} '{conversation_id}' not found: it was deleted, or is past the server's "
            "retention.",
            param=param,
            code="item_not_found" if item else "conversation_not_found",
        )


class ItemNotFound(NotFound):
    """An item_reference to no stored item of this project."""

    def __init__(self, item_id: str, param: str):
        super().__init__(
            f"Item with id '{item_id}' not found: it is no item of a stored response, or its "
            "response was deleted or is past the server's retention.",
            param=param,
            code="item_not_found",
        )


class KeepsNothing(InvalidRequest):
    """What needs kept conversations, on a server started with --no-store-responses."""

    def __init__(self, param: str):
        super().__init__(
            "This server keeps no responses nor conversations (it runs with "
            "--no-store-responses): send the whole conversation as input.",
            param=param,
            code="unsupported_parameter",
        )


class PreviousResponseNotFound(ResponseNotFound):
    """previous_response_id (or an earlier turn of its conversation) is not stored."""

    noun, param, code = "Previous response", "previous_response_id", "previous_response_not_found"


class JobAlreadyEnded(ServerError):
    """A cancel for a job that has already completed or failed."""

    status_code = 409
    error_type = "invalid_request_error"

    def __init__(self, job_id: str, status: str):
        super().__init__(
            f"Job `{job_id}` has already {status}; only queued or processing jobs can be "
            "cancelled.",
            param="id",
            code="job_not_cancellable",
        )


class FileStorageFull(InvalidRequest):
    """An upload past the project's file storage (--max-file-storage-bytes): a 400 until the
    project deletes files, so not one a client retries."""

    def __init__(self, used: int, size: int, limit: int):
        super().__init__(
            f"This upload ({size} bytes) would take the project's stored files past "
            f"{limit} bytes (the server's --max-file-storage-bytes; {used} bytes are stored "
            "now): delete files it no longer needs (DELETE /v1/files/{file_id}) and upload "
            "it again.",
            param="file",
            code="storage_limit_exceeded",
        )


class IdempotencyKeyReused(ServerError):
    """The Idempotency-Key already names a job made from a different request."""

    status_code = 409
    error_type = "invalid_request_error"

    def __init__(self, key: str):
        super().__init__(
            f"Idempotency-Key `{key}` was already used for a different request; "
            "use a new key for new work.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )


class StartupError(Exception):
    """The server cannot start as configured (an operator's to fix): shown as one line, and
    the process exits with status 2."""


class ModelLoadError(StartupError):
    """The checkpoint cannot be found or loaded; raised at start-up, shown to the operator."""


class JobStoreStartError(StartupError):
    """The job store named by --job-store cannot be opened at start-up."""


class EngineStopped(ServerError):
    status_code = 503
    error_type = "server_error"


class JobStoreUnavailable(ServerError):
    """The job store (its database) cannot be reached now; jobs and their status wait for it
    (503 + Retry-After). Synchronous requests do not need it."""

    status_code = 503
    error_type = "server_error"
    retry_after_s = 5

    def __init__(self) -> None:
        super().__init__(
            "The job store is unavailable; retry shortly (synchronous requests still work).",
            code="job_store_unavailable",
        )


class JobStoreUnconfirmed(ServerError):
    """A job's write was sent but the job store never confirmed it, nor answered after: the
    job may exist. Not a 503 (which says nothing was done, so a proxy may send the request to
    another replica): a second job would be made."""

    status_code = 504
    error_type = "server_error"

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"The job store did not confirm the job `{job_id}`: it may have been created. "
            "Look it up by that id before sending the request again, or send it again with "
            "the same Idempotency-Key.",
            code="job_store_unconfirmed",
        )


class NoRoomToSpool(ServerError):
    """The server's disk has no room for a download it spools (media by URL, a video): its
    fault, not the request's, and passing (503 + Retry-After); never the OS's words or a
    traceback."""

    status_code = 503
    error_type = "server_error"
    retry_after_s = 30

    def __init__(self, param: str) -> None:
        super().__init__(
            f"The server has no room on its disk for the media at {param} now; retry later.",
            param=param,
            code="insufficient_storage",
        )


class EngineOverloaded(ServerError):
    """The request queue is full, or the request waited too long in it (503 + Retry-After)."""

    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int, code: str = "server_overloaded"):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class ClientDisconnected(ServerError):
    """The client went away before its answer was ready; nobody reads this response."""

    status_code = 499
    error_type = "client_disconnected"

    def __init__(self) -> None:
        super().__init__("The client disconnected.")
