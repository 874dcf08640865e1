"""NVA benchmarks: each script measures NVA side by side with a named baseline in one run."""
