"""Measurements: the bench and its parts (suite), the plain loop lnsp is measured against
(plainloop, versus), one step's phase timings (probe), the OpenMP pool bench and the
container comparison."""
