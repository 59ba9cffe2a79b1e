"""The ``mimco`` command line."""
