"""gpud's web layer: the public TCP app and the admin Unix-socket app."""
