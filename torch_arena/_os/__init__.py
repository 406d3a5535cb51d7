"""The OS layer: anonymous memory files, mappings, cross-process locks and wake-ups."""
