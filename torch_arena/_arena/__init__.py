"""The arenas: one unit machinery, and the backends that find space for units."""
