"""Training-step benchmark: views/s of the full step, of augmentation and of the model alone,
augmentation share, peak memory, MFU (CUDA), the kNN monitor's share of an epoch, and the
reference per-image PIL + DataLoader loop, all in one process on synthetic CIFAR-sized data.

On a GPU machine (cifar_resnet18, bf16, torch.compile, channels_last by default on CUDA; the
reference loop with 8 DataLoader workers, as the reference repos run it)::

    python pipelines/bench.py --workers 8 --out bench.json

On a cluster (see README, "Run a sweep on a cluster"), on a GPU worker rather than the head::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --entrypoint-num-gpus 1 -- python pipelines/bench.py --workers 8

On a CPU (convnet, fp32, no compile by default there; fewer images for the epoch and kNN
timing, whose ratio does not depend much on the data set size). The README's CPU numbers::

    python pipelines/bench.py --methods simclr,moco,supcon --baseline simclr --threads 1 \\
        --repeats 3 --warmup 1 --steps 1 --train-size 5120 --test-size 1024
    python pipelines/bench.py --methods emp_ssl --baseline emp_ssl --threads 1 \\
        --repeats 3 --warmup 1 --steps 1 --train-size 1280 --test-size 256

    python pipelines/bench.py --smoke-test      # seconds: tiny model and data (what CI runs)

All flags: ``python pipelines/bench.py --help``. The logic is ``contrastlab.bench``.
"""

import sys

from contrastlab.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="pipelines/bench.py"))
