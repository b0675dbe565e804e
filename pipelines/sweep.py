"""Submit a hyperparameter sweep: Ray Tune + Optuna (TPE) + ASHA, every trial in MLflow.

On a cluster (docs/cluster.md)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python pipelines/sweep.py --space search_spaces/moco.yaml

Locally (starts a local Ray)::

    python pipelines/sweep.py --space search_spaces/simclr.yaml --smoke-test

All flags: ``python pipelines/sweep.py --help`` (the same as ``contrastlab sweep``).
"""

import sys

from contrastlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
