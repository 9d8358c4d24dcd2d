"""Training loops and the backends that run defence steps."""
