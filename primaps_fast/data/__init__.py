"""Data: synthetic scenes (tests, benchmarks, demo), datasets and the feature cache."""
