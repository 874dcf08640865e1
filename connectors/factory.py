"""Pick the connector for a SOURCE string: an http(s) FHIR base URL, an NDJSON export or a bundle directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.base import FhirSource
from connectors.errors import SourceFileError


def open_source(spec: str | Path, **options: Any) -> FhirSource:
    """SOURCE as given on the command line: an http(s) FHIR base URL, a bundle directory or an NDJSON directory."""
    text = str(spec)
    if text.startswith(("http://", "https://")):
        from connectors.rest import RestFhirSource

        return RestFhirSource.from_settings(text, **options)
    path = Path(text)
    if not path.exists():
        raise SourceFileError(
            text, "no such file or directory; give a FHIR base URL, a bundle directory or an NDJSON directory"
        )
    from connectors.ndjson_dir import NdjsonDirSource, is_ndjson_file

    if path.is_dir() and any(is_ndjson_file(p) for p in path.iterdir()):
        return NdjsonDirSource(path)
    from connectors.bundle_dir import BundleDirSource

    return BundleDirSource(path)
