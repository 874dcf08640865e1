"""FHIR R4 sources: REST servers, Bundle directories and Bulk Data NDJSON directories behind one interface."""

from connectors.base import FhirSource, PatientRecord, SourceCompleteness
from connectors.errors import (
    FhirAuthError,
    FhirError,
    FhirFatalError,
    FhirNotFoundError,
    FhirResponseError,
    FhirSettingsError,
    FhirTemporaryError,
    SourceFileError,
)
from connectors.factory import open_source

__all__ = [
    "FhirAuthError",
    "FhirError",
    "FhirFatalError",
    "FhirNotFoundError",
    "FhirResponseError",
    "FhirSettingsError",
    "FhirSource",
    "FhirTemporaryError",
    "PatientRecord",
    "SourceCompleteness",
    "SourceFileError",
    "open_source",
]
