"""A real model zoo for tallfmt's benchmarks: all-MiniLM-L6-v2 fine-tuned on text classification tasks
whose data ship inside PyPI wheels. See bench/zoo/README.md (install commands, tasks, cache, API)."""

import os

# Two cores shared with other work: with OpenMP threads spinning while they wait for a descheduled partner,
# a training step took 8-15 s under load here, 2-4 s with passive waits under similar load (noisy, but a
# microbenchmark agreed: ~2x). Takes effect only if torch is not imported yet (python -m bench.zoo.build);
# an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
