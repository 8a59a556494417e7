"""Data sets: the format on disk (dataset), your own text (text: read and split by
sentences, embedded by encode), public corpora, and the deterministic demo set (synth)."""
