"""Adversa's client: ``Client(url, api_key)`` (the SDK) and the ``adversa-client`` command.

Torch-free: it needs httpx, pydantic, typer, rich and the shared contract package ``contracts``.
"""

from adversa_client._version import __version__
from adversa_client.sdk import AdversaError, ApiError, Client, JobTimeout

__all__ = ["AdversaError", "ApiError", "Client", "JobTimeout", "__version__"]
