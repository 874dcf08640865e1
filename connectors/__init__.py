"""FHIR R4 sources: REST servers, Bundle directories and Bulk Data NDJSON directories behind one interface."""

from connectors.base import FhirSource, open_source
from connectors.errors import (
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirTemporaryError,
    SourceFileError,
)

__all__ = [
    "FhirAuthError",
    "FhirError",
    "FhirFatalError",
    "FhirNotFoundError",
    "FhirResponseError",
    "FhirSource",
    "FhirTemporaryError",
    "SourceFileError",
    "open_source",
]
