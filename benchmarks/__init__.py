"""attnflow benchmark suite: ``python -m benchmarks.run`` (or ``attnflow bench``)."""
