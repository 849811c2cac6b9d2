"""Job failures with a code and the Redis keys of cancel and liveness: they live in
``contracts.errors``; re-exported here for the workers' imports."""

from contracts.errors import (  # noqa: F401 - re-exported
    ALIVE_KEY,
    CANCEL_KEY,
    InvalidJob,
    JobCanceled,
    JobFailure,
)

__all__ = [
    "JobFailure",
    "InvalidJob",
    "JobCanceled",
    "CANCEL_KEY",
    "ALIVE_KEY",
]
