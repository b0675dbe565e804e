"""Submit an ablation: every cell x seed of a spec as a Ray Tune grid, analysed with 95% CIs.

On a cluster (docs/cluster.md)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python pipelines/ablate.py --spec search_spaces/ablations/supcon_contrast_count.yaml

Locally (starts a local Ray)::

    python pipelines/ablate.py --spec search_spaces/ablations/simclr_batch_size.yaml --smoke-test

Writes results.parquet (one row per run), summary.parquet/summary.md (mean, std, 95% CI per
cell) and two plots, and logs them to the ablation's MLflow parent run under analysis/.
All flags: ``python pipelines/ablate.py --help`` (the same as ``contrastlab ablate``).
"""

import sys

from contrastlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
