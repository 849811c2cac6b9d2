"""Job failures with a code, stored in the job's meta so that clients see ``{code, message}``."""

from __future__ import annotations


class JobFailure(Exception):
    """A job that cannot complete; ``code`` is a stable kebab-case id."""

    code = "job-failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidJob(JobFailure):
    code = "invalid-job"


class JobCanceled(JobFailure):
    code = "canceled"


CANCEL_KEY = "adversa:cancel:{}"
ALIVE_KEY = "adversa:alive:{}"
