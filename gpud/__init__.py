"""gpud: a systemd-native host daemon that runs GPU tasks in worker containers."""

__version__ = "0.1.0"
