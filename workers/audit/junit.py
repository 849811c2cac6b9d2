"""JUnit XML of an audit: it lives in ``contracts.junit`` (the client writes it too); re-exported
here for the workers' imports."""

from contracts.junit import (  # noqa: F401 - re-exported
    junit_error,
    junit_xml,
)

__all__ = [
    "junit_xml",
    "junit_error",
]
