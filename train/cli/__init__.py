"""The ``brst-train`` command line: :mod:`.main` is the group, one module per stage holds its commands."""
