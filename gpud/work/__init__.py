"""Work: task requests and records, event logs, submission, one-off runs and sessions."""
