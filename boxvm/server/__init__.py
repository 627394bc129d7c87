"""The REST server (``boxvm serve``)."""
