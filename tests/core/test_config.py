from pathlib import Path

import pytest

from core.config import Config, config_from_dict, load_config


def test_defaults_are_the_demo() -> None:
    cfg = load_config(env={})
    assert cfg.grid.preset == "5.625deg"
    assert cfg.task.channels() == ["geopotential_500", "u_component_of_wind_500", "v_component_of_wind_500"]
    assert cfg.paths.analysis_store == Path("spherecast-out/data/analysis.zarr")
    span = cfg.ingest.end - cfg.ingest.start
    assert span.days >= 60
    assert cfg.train.val_start > cfg.train.train_end


def test_yaml_then_env_override(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("grid: {preset: tiny}\ntrain: {batch_size: 4, lr: 0.01}\n")
    cfg = load_config(f, env={"SPHERECAST_TRAIN__BATCH_SIZE": "16", "SPHERECAST_TASK__LEVELS": "[500, 850]"})
    assert cfg.grid.preset == "tiny"
    assert cfg.train.batch_size == 16 and cfg.train.lr == 0.01
    assert cfg.task.levels == [500, 850]


def test_time_forms_operators_type() -> None:
    cfg = config_from_dict({"forecast": {"init_time": "2000-03-20T18"}})
    assert cfg.forecast.init_time.hour == 18
    assert config_from_dict({"forecast": {"init_time": "latest"}}).forecast.init_time == "latest"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"train": {"batchsize": 3}}, "unknown key 'train.batchsize'"),
        ({"nonsense": 1}, "unknown key 'nonsense'"),
        ({"grid": {"preset": "3deg"}}, "unknown grid preset '3deg'"),
        ({"task": {"variables": ["t2m"]}}, "unknown variable 't2m'"),
        ({"task": {"levels": [499]}}, "499"),
        ({"ingest": {"start": "2000-02-01", "end": "2000-01-01"}}, "before ingest.start"),
        ({"train": {"val_start": "2000-01-02"}}, "must come after train_end"),
        ({"forecast": {"init_time": "yesterday"}}, "not a date/time"),
    ],
)
def test_bad_config_names_the_problem(data: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="invalid config") as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_missing_or_bad_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(f, env={})


def test_every_field_is_documented() -> None:
    def walk(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(Config)
