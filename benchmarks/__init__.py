"""Benchmarks: speed and memory of the project's choices against their alternatives (`make bench`)."""
