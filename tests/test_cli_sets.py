"""`contrastlab sweep|ablate --set KEY=VALUE`: applied to the spec's base, checked before
anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from contrastlab.cli import apply_sets, main
from contrastlab.config import ConfigError
from contrastlab.sweep.ablation import load_ablation
from contrastlab.sweep.space import load_space

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "simclr.yaml"
SPEC = ROOT / "search_spaces" / "ablations" / "digits_supcon_contrast_count.yaml"


def test_set_changes_the_base_of_every_trial_and_fixes_a_searched_param():
    space = load_space(SPACE)
    assert "method.temperature" in space.param_paths
    out = apply_sets(
        space,
        ["data.dataset=digits", "data.image_size=16", "method.temperature=0.2"],
        "sweep",
    )
    assert "method.temperature" not in out.param_paths  # fixed, no longer searched
    cfg = out.config_for({p.path: p.reference for p in out.params})
    assert (cfg.data.dataset, cfg.data.image_size, cfg.method.temperature) == ("digits", 16, 0.2)
    assert out.trials == space.trials and out.name == space.name


def test_set_on_an_ablation_changes_every_cell_but_not_a_factor():
    spec = load_ablation(SPEC)
    out = apply_sets(spec, ["method.temperature=0.3", "data.image_size=12"], "ablate")
    for cell in out.cells:
        cfg = out.config_for({**cell, "train.seed": 0})
        assert (cfg.method.temperature, cfg.data.image_size) == (0.3, 12)
    with pytest.raises(ConfigError, match="method.contrast_count: is a factor"):
        apply_sets(spec, ["method.contrast_count=2"], "ablate")


@pytest.mark.parametrize(
    ("command", "flag", "path"), [("sweep", "--space", SPACE), ("ablate", "--spec", SPEC)]
)
def test_a_bad_set_key_is_a_clear_error_and_nothing_starts(
    tmp_path, capsys, monkeypatch, command, flag, path
):
    import ray

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    rc = main(
        [command, flag, str(path), "--set", "data.datset=x", "--tracking-uri", f"sqlite:///{db}"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "base.data.datset: unknown key (did you mean 'dataset'?)" in err
    assert "--set data.datset=x" in err
    assert not db.exists() and not (tmp_path / "sweeps").exists()  # no MLflow, no trial
    assert not ray.is_initialized()
    rc = main([command, flag, str(path), "--set", "optim.lr=-1"])
    assert rc == 2 and "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_new_dataset_space_runs_on_parquet_shards_pointed_at_by_set(tmp_path, capsys):
    """The new-dataset space, shrunk by --smoke-test, on a learnability task's Parquet shards:
    every trial trains on those shards (not the space's digits) and logs the label-free
    monitors next to kNN."""
    import ray

    from contrastlab import tracking
    from contrastlab.data.tasks import write_task

    write_task("colour", tmp_path / "colour")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "sweep",
        "--space",
        str(ROOT / "search_spaces" / "new_dataset.yaml"),
        "--smoke-test",
        "--name",
        "nd",
        "--set",
        "data.dataset=parquet",
        "--set",
        f"data.root={tmp_path / 'colour' / 'train'}",
        "--set",
        f"data.test_root={tmp_path / 'colour' / 'test'}",
        "--set",
        "data.image_size=16",
        "--storage-path",
        str(tmp_path / "sweeps"),
        "--tracking-uri",
        uri,
    ]
    try:
        rc = main(args)  # starts a local Ray in this process
    finally:
        ray.shutdown()
    assert rc == 0, capsys.readouterr().err[-3000:]
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("contrastlab-new_dataset")
    parent = tracking.find_parent(uri, exp.experiment_id, "nd")
    runs = tracking.child_runs(uri, exp.experiment_id, parent)
    assert len(runs) == 3
    for run in runs:
        assert run.data.params["data.dataset"] == "parquet"
        assert run.data.params["data.root"] == str(tmp_path / "colour" / "train")
        for key in ("knn_top1", "rankme", "alignment", "uniformity", "nuisance_r2"):
            assert key in run.data.metrics, key
    assert any(r.info.status == "FINISHED" for r in runs)
