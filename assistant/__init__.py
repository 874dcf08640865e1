"""NVA core: chart model, normalization, contradiction rules, summaries and audit."""
