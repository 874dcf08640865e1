"""Typed errors for FHIR sources: retryable (temporary) versus fatal, each saying what to do."""

from __future__ import annotations


class FhirError(Exception):
    """Base for every error a FHIR source raises."""

    retryable = False

    def __init__(
        self, message: str, *, url: str | None = None, status: int | None = None, outcome: object = None
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.outcome = outcome  # the server's OperationOutcome, when it sent one


class FhirTemporaryError(FhirError):
    """The server is busy, down or slow; trying again later may work."""

    retryable = True


class FhirFatalError(FhirError):
    """The request cannot succeed as sent; retrying will not help."""


class FhirNotFoundError(FhirFatalError):
    """The resource or patient does not exist on the server."""


class FhirAuthError(FhirFatalError):
    """Credentials are missing, wrong or expired beyond one re-authentication."""


class FhirSettingsError(FhirFatalError):
    """A FHIR setting (NVA_FHIR_*) has a value that cannot be used; the message names it and what to set."""


class FhirResponseError(FhirFatalError):
    """The server answered with something that is not the FHIR JSON expected (HTML, truncated JSON, ...)."""


class SourceFileError(FhirFatalError):
    """A file in a bundle or NDJSON directory cannot be read as FHIR."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}", url=path)
        self.path = path
        self.reason = reason
