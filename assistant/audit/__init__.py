"""Batch chart audit: partitioning, local and dask engines, checkpointed runs and reports."""
