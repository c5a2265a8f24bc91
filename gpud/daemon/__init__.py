"""The composition root: builds the services, serves both apps, handles signals, reload and systemd."""
