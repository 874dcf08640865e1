"""NVA test suite."""
