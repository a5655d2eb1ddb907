"""Avatar templates: preparation, the on-disk cache, and per-frame face data."""
