"""Renderers: audio in, avatar frames out, on the session's media timeline."""
