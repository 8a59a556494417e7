"""Watching runs from their records: status and watch, TensorBoard events, the plots,
the progress bar and rate."""
