"""Cited patient summaries and I-PASS handoffs: fact sheet, composer, verifier."""
