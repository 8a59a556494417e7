"""Data sets: the format on disk (dataset), your own text (text), public corpora, and the
deterministic demo set (synth)."""
