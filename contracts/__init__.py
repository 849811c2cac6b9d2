"""The wire contract of Adversa, torch-free (pydantic and the standard library only).

The gateway (``service``), the workers (``workers``) and the client distribution
(``adversa_client``) all import it and never each other: request bodies and job payloads
(``contracts.specs``), job views and pages (``contracts.views``), the settings every server process
reads (``contracts.settings``), job failure codes and the Redis keys both sides use
(``contracts.errors``), Wilson intervals (``contracts.intervals``) and the JUnit report of an audit
(``contracts.junit``). Nothing is imported here, so ``import contracts.specs`` loads only that.
"""
