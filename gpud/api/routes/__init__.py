"""Route handlers, one module per resource; each takes the services it needs from its own app key."""
