"""Trust at the edges: roles and ward access, the access audit log, PHI-safe logging, LLM egress rules."""
