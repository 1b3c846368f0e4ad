"""Stage 5, chapters: one call per chapter step, owning its parameters, caching and derived tables."""
