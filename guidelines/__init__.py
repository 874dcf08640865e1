"""Nursing guideline ingestion, vector store and hybrid retrieval."""
