"""bench.py's parts: the inputs it generates, how it measures, and each part's rows (python bench.py runs them)."""
