"""The contract of Adversa, torch-free: what the gateway (``service``), the workers (``workers``) and
the client distribution (``adversa_client``) share, so that they import it and never each other.

The wire contract, pydantic and the standard library only, which the client uses too: request
bodies and job payloads (``contracts.specs``), one entry per attack (``contracts.attacks``: its
Params, norms, flags, budget rule and where its kernel is), job views and pages
(``contracts.views``), the settings every server process reads (``contracts.settings``), job
failure codes and the Redis keys both sides use (``contracts.errors``), Wilson intervals
(``contracts.intervals``), the gate grammar (``contracts.gate``) and the JUnit report of an audit
(``contracts.junit``).

The server side only, never imported by the client (its venv has no redis, rq or matplotlib): the
Redis protocol between workers and gateway, which workers are alive and warm
(``contracts.liveness``) and the job metrics they record (``contracts.telemetry``), both on redis
and rq; the accuracy charts both draw (``contracts.charts``, matplotlib on first use).
``tests/unit/test_layering.py`` checks both rules.

Nothing is imported here, so ``import contracts.specs`` loads only that.
"""
