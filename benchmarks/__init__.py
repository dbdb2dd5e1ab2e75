"""Reproducible performance and quality measurements (`make bench`, `make soak`)."""
