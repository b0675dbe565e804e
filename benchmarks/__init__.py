"""Benchmarks of contrastlab: they import the package, the package never imports them.

Run from the repository root (a package, so ``augment`` can share ``step``'s PIL reference
pipeline); each module's docstring has its exact commands, docs/benchmarks.md the results:

    python -m benchmarks.step --smoke-test     # training step, reference loop, MFU, kNN share
    python -m benchmarks.augment               # batched augmentation vs per-image PIL, kornia
    python -m benchmarks.sweep                 # fixed cost per sweep trial
    python -m benchmarks.learn                 # time to a kNN target vs the naive SimCLR loop

``python pipelines/bench.py`` runs ``benchmarks.step`` with the same flags.
"""
