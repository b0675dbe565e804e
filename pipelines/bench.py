"""Training-step benchmark: views/s of the full step, of augmentation and of the model alone,
augmentation share, peak memory, MFU (CUDA), the kNN monitor's share of an epoch, and the
reference per-image PIL + DataLoader loop, all in one process on synthetic CIFAR-sized data.

On a GPU node (cifar_resnet18, bf16, torch.compile, channels_last by default on CUDA)::

    python pipelines/bench.py --out bench.json
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python pipelines/bench.py --workers 8 --out bench.json

On a CPU (convnet, fp32 by default there; fewer images for the epoch and kNN timing)::

    python pipelines/bench.py --methods simclr,emp_ssl --train-size 5120 --test-size 1024 \\
        --repeats 3

    python pipelines/bench.py --smoke-test      # seconds: tiny model and data (what CI runs)

All flags: ``python pipelines/bench.py --help``. The logic is ``contrastlab.bench``.
"""

import sys

from contrastlab.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="pipelines/bench.py"))
