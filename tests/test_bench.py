"""The benchmarks (benchmarks/step.py, run by pipelines/bench.py; benchmarks/augment.py):
structure, not speed.

No test here asserts a timing: they check that a smoke run measures everything it claims to
(finite, positive numbers in a complete result), that the FLOP count behind MFU matches a
closed form, and that the CUDA-only arithmetic (peak lookup, MFU) is right, on the CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from benchmarks import step
from benchmarks.step import BenchSettings, check_settings, count_step_flops, peak_tflops
from contrastlab.config import make_config

METHOD_KEYS = {
    "method",
    "views_per_image",
    "views_per_step",
    "step_s",
    "views_per_s",
    "augment_views_per_s",
    "model_views_per_s",
    "augment_share",
    "peak_memory_mib",
    "flops_per_step",
    "achieved_tflops",
    "final_loss",
    "mfu",
    "epoch_s",
    "epoch_views_per_s",
    "knn_s",
    "knn_share",
}
BASELINE_KEYS = {
    "method",
    "workers",
    "views_per_step",
    "step_s",
    "views_per_s",
    "augment_views_per_s",
    "model_views_per_s",
    "augment_share",
    "peak_memory_mib",
    "ours_over_baseline",
}
POSITIVE = (
    "step_s",
    "views_per_s",
    "augment_views_per_s",
    "model_views_per_s",
    "augment_share",
    "peak_memory_mib",
)


def _positive_finite(row: dict, keys) -> None:
    for k in keys:
        assert isinstance(row[k], float | int) and math.isfinite(row[k]) and row[k] > 0, (k, row)


def test_smoke_run_measures_everything_and_the_baseline_runs():
    # one thread: on a loaded 2-core machine two OpenMP threads wait on each other at every
    # tiny op (28 s instead of 2 s here)
    settings = BenchSettings(
        methods=("simclr",), baseline=("simclr",), device="cpu", smoke=True, threads=1
    )
    threads = torch.get_num_threads()
    r = step.run(settings)
    assert torch.get_num_threads() == threads  # restored
    assert r["machine"]["torch_threads"] == 1
    json.dumps(r, allow_nan=False)  # JSON-able, and no NaN/inf anywhere

    (m,) = r["methods"]
    assert m.keys() >= METHOD_KEYS
    _positive_finite(m, (*POSITIVE, "flops_per_step", "achieved_tflops", "epoch_s", "knn_s"))
    assert m["views_per_step"] == 16 * 2 and m["views_per_image"] == 2
    assert math.isfinite(m["final_loss"]) and 0 < m["knn_share"] == m["knn_s"] / m["epoch_s"]
    assert m["mfu"] is None  # no peak to divide by on a CPU

    (b,) = r["baseline"]
    assert b.keys() >= BASELINE_KEYS
    _positive_finite(b, (*POSITIVE, "ours_over_baseline"))
    assert b["views_per_step"] == m["views_per_step"]  # same batch, same number of views
    assert b["ours_over_baseline"] == pytest.approx(m["views_per_s"] / b["views_per_s"])

    s = r["settings"]
    assert (s["backbone"], s["precision"], s["compile"]) == ("convnet", "fp32", False)
    text = step.format_tables(r)
    assert r["machine"]["torch"] in text and "| simclr |" in text and "ours / ref" in text
    assert "peak RSS" in text  # says which memory it measured


def test_flop_count_matches_the_closed_form():
    # SimCLR, convnet, linear head: forward = 4 convs + head + the [N, D] x [D, N] similarity
    # matrix; backward = 2x forward (input and weight gradients), except the first conv,
    # whose input needs no gradient.
    B, S, w, P = 8, 16, 8, 16
    cfg = make_config(
        {
            "method": {"name": "simclr"},
            "model": {"backbone": "convnet", "width": w, "head": "linear", "proj_dim": P},
            "data": {"image_size": S},
            "train": {"device": "cpu", "batch_size": B},
        }
    )
    views = torch.randn(2, B, 3, S, S)
    flops = count_step_flops(cfg, 64, views, torch.zeros(B, dtype=torch.long), torch.arange(B))
    n = 2 * B
    chans = [3, w, 2 * w, 4 * w, 4 * w]
    convs = [2 * n * chans[i] * chans[i + 1] * 9 * (S >> i) ** 2 for i in range(4)]
    forward = sum(convs) + 2 * n * (4 * w) * P + 2 * n * n * P
    assert flops == 3 * forward - convs[0]


def test_mfu_arithmetic_of_the_cuda_path(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    bf16 = make_config({"train": {"precision": "bf16", "device": "cpu"}})
    u = step._utilisation(torch.device("cuda"), bf16, flops=10**12, step_s=0.01, model_s=0.005)
    assert u["peak_dtype"] == "bf16" and u["peak_tflops"] == 989.4
    assert u["mfu"] == pytest.approx(100 / 989.4) and u["model_mfu"] == pytest.approx(200 / 989.4)
    fp32 = make_config({"train": {"device": "cpu"}})
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert step._utilisation(torch.device("cuda"), fp32, 10**12, 1.0, 1.0)["peak_dtype"] == "tf32"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert step._utilisation(torch.device("cuda"), bf16, 10**12, 1.0, 1.0)["mfu"] is None


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "tf32", 417.5),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA A10", "fp32", 31.2),
        ("NVIDIA A10G", "bf16", None),  # not an A10: unknown rather than wrong
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_table_lookup(name, dtype, peak):
    assert peak_tflops(name, dtype) == peak


def test_device_defaults_and_any_registered_method():
    from contrastlab.methods import METHODS

    s = check_settings(BenchSettings(methods=tuple(METHODS), device="cpu", smoke=True))
    assert (s.backbone, s.precision, s.compile, s.steps) == ("convnet", "fp32", False, 1)
    full = BenchSettings(device="cpu").resolved()
    assert (full.train_size, full.test_size, full.batch) == (50_000, 10_000, 256)
    # a queue that must be a multiple of the batch is rounded up, not rejected
    assert step.bench_config("moco", BenchSettings(batch=96, device="cpu").resolved())


def test_command_line_rejects_bad_input_before_measuring(capsys):
    with pytest.raises(SystemExit) as e:
        step.main(["--methods", "simclr,nope", "--device", "cpu"])
    assert e.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        step.main(["--device", "cpu", "--batch", "512", "--train-size", "256"])
    assert "must be at least the batch" in capsys.readouterr().err


def test_timers_take_turns_and_report_medians(monkeypatch):
    calls: list[str] = []

    def timer(name: str):
        return lambda: calls.append(name)

    pipes = [
        step.Pipeline("ours", 4, {"step": timer("o.step"), "model": timer("o.model")}),
        step.Pipeline("reference", 4, {"step": timer("r.step")}),
    ]
    # a fake clock: the k-th timed call lasts k seconds
    ticks = iter(x for k in range(1, 10) for x in (0.0, float(k)))
    monkeypatch.setattr(step, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = step.time_interleaved(pipes, torch.device("cpu"), repeats=3)
    assert calls == ["o.step", "o.model", "r.step"] * 3  # round-robin, one call each per round
    # o.step lasted 1, 4, 7 s; o.model 2, 5, 8 s; r.step 3, 6, 9 s
    assert out == {"ours": {"step": 4.0, "model": 5.0}, "reference": {"step": 6.0}}


def test_reference_loop_with_a_dataloader_worker(tmp_path):
    s = check_settings(
        BenchSettings(methods=(), baseline=("simclr",), device="cpu", smoke=True, workers=1)
    )
    data = step.synthetic_splits(s.train_size, s.test_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = step.measure("simclr", s, data, tmp_path, ours=False, reference=True)
    finally:
        torch.set_num_threads(threads)
    assert set(out) == {"reference"}
    ref = out["reference"]
    assert ref["workers"] == 1 and ref["views_per_step"] == 16 * 2
    _positive_finite(ref, POSITIVE)


def test_the_cuda_defaults_bf16_and_channels_last_run_on_cpu():
    # the settings a GPU run uses by default (bf16 autocast, channels_last), on the CPU: the
    # FLOP count under autocast and a step of a method with a momentum encoder and a queue
    s = BenchSettings(
        methods=("moco",), baseline=(), device="cpu", precision="bf16", smoke=True, threads=1
    )
    (m,) = step.run(replace(s, epoch=False))["methods"]
    _positive_finite(m, (*POSITIVE, "flops_per_step"))
    assert "knn_s" not in m and math.isfinite(m["final_loss"])


def test_epoch_timed_on_part_of_the_set_is_scaled_to_all_of_it():
    """--epoch-images: a CIFAR-sized epoch estimated from a shorter one (steps cost the same);
    the kNN monitor still runs on its subsets of the whole set."""
    settings = BenchSettings(
        methods=("simclr",),
        baseline=(),
        device="cpu",
        smoke=True,
        threads=1,
        train_size=96,
        epoch_images=32,
    )
    (m,) = step.run(settings)["methods"]
    assert (m["train_size"], m["epoch_images_timed"]) == (96, 32)
    timed_views = 32 // 16 * 16 * 2  # 2 steps of 16 images x 2 views
    # 6 steps in the whole set, 2 timed
    assert m["epoch_s"] == pytest.approx(3 * timed_views / m["epoch_views_per_s"], rel=1e-3)
    assert m["knn_share"] == m["knn_s"] / m["epoch_s"]
    assert (m["knn_memory_images"], m["knn_query_images"]) == (96, 32)  # below the subsets


def test_augmentation_benchmark_runs_and_compares_with_the_reference(tmp_path):
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.augment", "--batch", "4", "--views", "2"]
        + ["--repeats", "1", "--threads", "1", "--recipe", "simclr"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert re.search(r"\| PIL per image \(1 thr\) +\| +\d+ \| +1\.0x \|", out), out
    assert "BatchAugment" in out and "kornia" in out


def test_reference_transform_has_the_opt_in_ops_only_when_on():
    import pickle

    import numpy as np
    from PIL import Image

    from benchmarks.step import reference_transform

    def names(augment):
        cfg = make_config({"augment": {"recipe": "simclr", **augment}}).augment
        t = reference_transform(cfg, 16, 3, (0.5,) * 3, (0.25,) * 3)
        img = Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8))
        assert t(img).shape == (3, 16, 16)
        pickle.dumps(t)  # DataLoader workers receive it
        return [type(op).__name__ for op in t.transforms]

    plain = names({})
    assert "RandomRotation" not in plain and "RandomErasing" not in plain
    later = {
        "rotate_degrees": 20.0,
        "channel_shuffle_p": 0.5,
        "channel_gain": [0.5, 1.5],
        "invert_p": 0.2,
        "erase_p": 0.3,
    }
    on = names(later)
    # BatchAugment's order: geometry, shuffle, gain, jitter ..., invert, normalise, erase
    assert on[:5] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomRotation",
        "RandomApply",
        "_PILChannelGain",
    ]
    assert on[-4:] == ["RandomInvert", "ToTensor", "Normalize", "RandomErasing"]
