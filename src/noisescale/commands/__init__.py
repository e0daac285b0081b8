"""One module per ``noisescale`` command (see :mod:`noisescale.cli`)."""
