"""The team server's errors a user fixes from the message alone (the CLI prints one line, exit 2)."""


class TrackingServerError(RuntimeError):
    """PostgreSQL or the MLflow server could not be started, or may not start as asked; the message says what to do."""


class SecretFileError(ValueError):
    """A secret's file is missing, empty or readable by others; the message says how to fix it."""
