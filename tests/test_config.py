"""Config: typed, frozen, unknown keys and wrong types named, recipes resolved, overrides."""

import pydantic
import pytest
import yaml

from contrastlab.config import (
    AUGMENT_RECIPES,
    METHOD_CONFIGS,
    Config,
    ConfigError,
    load_config,
    make_config,
    saved_config,
)


def test_default_config_is_the_builtin_digits_run():
    cfg = make_config()
    assert cfg.method.name == "simclr"
    assert cfg.data.dataset == "digits"
    assert cfg.augment.recipe == "digits"


def test_frozen():
    cfg = make_config()
    with pytest.raises(pydantic.ValidationError):
        cfg.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, key, allowed",
    [
        ({"optim": {"lrr": 0.1}}, "optim.lrr", "did you mean 'lr'"),
        ({"method": {"name": "simclr", "queue_size": 64}}, "method.queue_size", "temperature"),
        ({"method": {"name": "moco", "num_patches": 4}}, "method.num_patches", "queue_size"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
    ],
)
def test_unknown_key_names_key_and_allowed(raw, key, allowed):
    with pytest.raises(ConfigError) as e:
        make_config(raw)
    assert key in str(e.value)
    assert allowed in str(e.value)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),
        ({"method": {"name": "emp_ssl", "eps": 0}}, "method.eps"),
        ({"method": {"name": "emp_ssl", "num_patches": 1}}, "method.num_patches"),
        ({"method": {"name": "simclr", "temperature": -1}}, "method.temperature"),
        ({"augment": {"crop_scale": [0.9, 0.1]}}, "augment.crop_scale"),
        ({"data": {"dataset": "cifar10"}}, "data.root"),
        (
            {"method": {"name": "moco", "queue_size": 100}, "train": {"batch_size": 64}},
            "method.queue_size",
        ),
        ({"method": {"name": "byol"}}, "method.name"),
        ({"augment": {"recipe": "fancy"}}, "augment.recipe"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        make_config(raw)
    assert key in str(e.value)


def test_recipe_defaults_resolved_and_explicit_fields_win():
    emp = make_config({"method": {"name": "emp_ssl"}})
    assert emp.augment.recipe == "emp_ssl"
    assert emp.augment.crop_scale == (0.25, 0.25) and emp.augment.crop_ratio == (1.0, 1.0)
    assert emp.augment.solarize_p == 0.1 and emp.augment.blur_p == 0.1
    assert emp.eval.feature == "patch_avg"
    mine = make_config({"method": {"name": "emp_ssl"}, "augment": {"solarize_p": 0.0}})
    assert mine.augment.solarize_p == 0.0
    assert set(AUGMENT_RECIPES["emp_ssl"]) <= set(type(emp.augment).model_fields)


def test_recipe_follows_method_and_dataset():
    assert make_config().augment.recipe == "digits"
    assert make_config().augment.flip_p == 0.0
    cifar = make_config({"data": {"dataset": "cifar10", "root": "x"}})
    assert cifar.augment.recipe == "simclr" and cifar.augment.flip_p == 0.5
    assert make_config({"method": {"name": "emp_ssl"}}).augment.recipe == "emp_ssl"


def test_emp_ssl_gets_the_upstream_recipe_unless_set():
    cfg = make_config({"method": {"name": "emp_ssl"}})
    assert (cfg.model.proj_dim, cfg.optim.name, cfg.train.epochs) == (1024, "lars", 10)
    mine = make_config(
        {"method": {"name": "emp_ssl"}, "optim": {"name": "sgd"}, "model": {"proj_dim": 64}}
    )
    assert (mine.model.proj_dim, mine.optim.name) == (64, "sgd")
    assert make_config({"method": {"name": "simclr"}}).optim.name == "sgd"


def test_moco_v1_gets_linear_head_unless_set():
    assert make_config({"method": {"name": "moco", "variant": "v1"}}).model.head == "linear"
    assert make_config({"method": {"name": "moco"}}).model.head == "mlp"
    cfg = make_config({"method": {"name": "moco", "variant": "v1"}, "model": {"head": "mlp"}})
    assert cfg.model.head == "mlp"


def test_no_hidden_supcon_rescaling_by_default():
    assert make_config({"method": {"name": "supcon"}}).method.base_temperature is None


def test_overrides_and_yaml_roundtrip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"method": {"name": "supcon", "contrast_count": 3}}))
    cfg = load_config(f, ["method.temperature=0.2", "train.epochs=3", "model.head=linear"])
    assert cfg.method.temperature == 0.2 and cfg.method.contrast_count == 3
    assert cfg.train.epochs == 3 and cfg.model.head == "linear"
    # the resolved YAML reloads to the identical config: what is saved is what ran
    again = make_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.flat()["method.contrast_count"] == 3


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: many}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "bad.yaml" in str(e.value) and "train.epochs" in str(e.value)
    with pytest.raises(ConfigError, match="KEY=VALUE|section.key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("output_dir", "/data/runs", "--output-dir"),
        ("run_name", "mine", "--run-name"),
        ("progress", False, "--progress / --no-progress"),
    ],
)
def test_a_run_place_key_in_a_users_file_names_the_flag_that_replaced_it(
    tmp_path, key, value, flag
):
    """Where a run is written and whether it shows progress are `contrastlab train` flags: a
    config file (or --set) that still sets them is refused, naming the key and the flag."""
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"train": {"epochs": 3, key: value}}))
    for args in ((f,), (None, [f"train.{key}={value}"])):
        with pytest.raises(ConfigError) as e:
            load_config(*args)
        msg = str(e.value)
        assert f"train.{key}: not a config key" in msg and "did you mean" in msg, msg
        assert f"`contrastlab train` flag {flag}?" in msg, msg


def test_a_saved_config_of_an_earlier_version_drops_the_run_place_keys():
    """Run directories and MLflow runs written before the run place left the config hold
    train.output_dir/run_name/progress in their config.yaml: those still load, as the same
    config without them; any other unknown key is still an error."""
    cfg = make_config({"method": {"name": "moco"}, "train": {"epochs": 3}})
    raw = yaml.safe_load(cfg.to_yaml())
    raw["train"].update(output_dir="runs", run_name="old-run", progress=True)
    assert saved_config(yaml.safe_dump(raw)) == cfg
    raw["train"]["epohcs"] = 3
    with pytest.raises(ConfigError, match="train.epohcs"):
        saved_config(yaml.safe_dump(raw))


def test_every_method_has_a_config_and_round_trips():
    for name in METHOD_CONFIGS:
        cfg = make_config({"method": {"name": name}})
        assert isinstance(cfg, Config) and cfg.method.name == name
        assert make_config(cfg.to_dict()) == cfg
