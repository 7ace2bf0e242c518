"""A real model zoo for tallfmt's benchmarks: all-MiniLM-L6-v2 fine-tuned on text classification tasks
whose data ship inside PyPI wheels. See bench/zoo/README.md (install commands, tasks, cache, API)."""
