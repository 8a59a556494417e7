"""lnsp's trainer: the loop (fit, run), the one training step (trainer), what a run leaves
behind (recorder), evaluation, checkpoints and the ranks of a distributed job."""
