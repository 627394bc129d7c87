"""Backends: where boxes actually live. ``Runtime`` and ``Box`` hold one and never ask which."""
