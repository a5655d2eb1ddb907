"""HTTP and signaling: the aiohttp app, its routes, and request validation."""
