"""Measurement helpers shared by the tests and the benchmarks under scripts/: a receiving peer that
records what arrives, a synthetic sender for calibration, and the lip-offset estimator."""
