"""Reproduce a tracked trial locally, without Ray, and compare its metrics epoch by epoch.

    python pipelines/reproduce.py --run-id <MLflow run id>
    python pipelines/reproduce.py --best-of contrastlab-moco --tracking-uri http://127.0.0.1:5000
    python pipelines/reproduce.py --run-id <id> --workers 4      # 4 local GPUs (DDP)

Exit code 0 when the metrics match (exactly on CPU, within a stated tolerance on GPU), 3 when
they do not. The reproduction is logged to MLflow, tagged contrastlab.reproduces=<run id>.
All flags: ``python pipelines/reproduce.py --help`` (the same as ``contrastlab reproduce``).
"""

import sys

from contrastlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
