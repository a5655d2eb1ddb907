"""Peer sessions, the media clock, and the tracks that read the synchronized playout."""
