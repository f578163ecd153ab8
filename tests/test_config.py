"""Run configuration: defaults, YAML + override precedence, one-line errors with suggestions, round trip."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from mmke.config import RunConfig, describe_fields, load_config
from mmke.errors import ConfigError
from mmke.registry import methods


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults() -> None:
    cfg = load_config(None, [])
    assert cfg == RunConfig()
    # the main job runs every method (the six of the papers first) but those that would stretch it
    # (T-Patcher: 1.2 s an edit) or edit little on the world model (VisEdit, LiveEdit: README);
    # noop is the unedited baseline
    assert cfg.methods[:7] == ("ft_llm", "ft_projector", "ft_vision", "ike", "serac", "mend", "ke")
    left_out = {"ft", "noop", "tpatcher", "visedit", "liveedit"}
    assert set(cfg.methods) == set(methods.names()) - left_out
    assert (cfg.protocol, cfg.gaps, cfg.checkpoints, cfg.limit, cfg.scoring) == (
        "single",
        (10, 20, 50, 100),
        (10, 100),
        None,
        "mmke",
    )


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"limit": 10, "methods": ["ike"], "seed": 3, "method_options": {"ft_llm": {"steps": 5, "lr": 0.1}}},
    )
    cfg = load_config(path, ["limit=50", "generate=true", "method_options.ft_llm.steps=20", "gaps=10,20"])
    assert cfg.limit == 50  # override beats the file
    assert cfg.methods == ("ike",) and cfg.seed == 3  # the file beats the defaults
    assert cfg.evaluation == ("teacher_forced", "generation") and cfg.gaps == (10, 20)  # the old flag
    assert cfg.method_options == {"ft_llm": {"steps": 20, "lr": 0.1}}  # dotted keys merge


def test_override_value_forms() -> None:
    cfg = load_config(None, ["methods=[ft_llm,ike]", "limit=null", "edit_types=visual_entity", "out=2024"])
    assert cfg.methods == ("ft_llm", "ike")
    assert cfg.limit is None and cfg.edit_types == ("visual_entity",) and cfg.out == "2024"
    assert load_config(None, ["methods=ft_llm,ike"]).methods == ("ft_llm", "ike")
    assert load_config(None, ["method_options.ike={k: 4}"]).method_options == {"ike": {"k": 4}}


@pytest.mark.parametrize(
    ("yaml_data", "overrides", "message"),
    [
        ({"limt": 5}, [], "unknown config key 'limt' in .*run.yaml; did you mean 'limit'?"),
        ({}, ["protocl=single"], "unknown config key 'protocl' in overrides; did you mean 'protocol'?"),
        ({}, ["metods.x=1"], "unknown config key 'metods'.*did you mean 'methods'?"),
        ({}, ["limit.x=1"], "judge_options.<setting>=value take dotted keys"),
        ({}, ["limit"], "expected key=value"),
        ({}, ["protocol=sequental"], "protocol='sequental': expected one of .*did you mean 'sequential'?"),
        ({}, ["scoring=vlkb"], "did you mean 'vlkeb'?"),
        ({}, ["edit_types=[visual_entiti]"], "did you mean 'visual_entity'?"),
    ],
)
def test_bad_keys_give_one_line_errors_with_suggestions(
    tmp_path: Path, yaml_data: dict, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(tmp_path, yaml_data), overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("limit=abc", "limit='abc': expected an integer, got str"),
        ("generate=maybe", "generate='maybe': expected true or false"),
        ("batch_size=2.5", "batch_size=2.5: expected an integer, got float"),
        ("gaps=[10,x]", r"gaps\[1\]='x': expected an integer"),
        ("method_options=3", "method_options=3: expected a mapping"),
        ("method_options.ike=5", "method_options.ike=5: expected a mapping of settings"),
        ("batch_size=0", "batch_size=0: must be at least 1"),
        ("methods=[]", "methods: name at least one method"),
        ("seed=true", "seed=True: expected an integer, got bool"),
    ],
)
def test_type_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping of settings"):
        load_config(write(tmp_path, "- a\n- b\n"), [])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "limit: [1\n"), [])
    with pytest.raises(ConfigError, match="cannot read "):
        load_config(tmp_path / "missing.yaml", [])
    assert load_config(write(tmp_path, ""), []) == RunConfig()


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    overrides = ["methods=[ike]", "limit=7", "edit_types=[user_specific]", "scoring=vlkeb"]
    overrides += ["image_root=/data/img", "method_options.ike.k=3", "protocol=sequential", "gaps=[1,2]"]
    cfg = load_config(None, [*overrides, "skip_bad=true"])
    path = write(tmp_path, cfg.to_dict())
    assert load_config(path, []) == cfg
    assert load_config(write(tmp_path, RunConfig().to_dict()), []) == RunConfig()


def test_describe_fields_covers_every_setting() -> None:
    rows = describe_fields()
    assert [r[0] for r in rows] == [f.name for f in fields(RunConfig)]
    assert all(help_text for *_, help_text in rows)
    by_name = {r[0]: r for r in rows}
    assert by_name["limit"][1:3] == ("int | None", "null")
    assert by_name["gaps"][1:3] == ("tuple[int, ...]", "[10, 20, 50, 100]")
    assert by_name["evaluation"][1:3] == ("tuple[str, ...]", "[teacher_forced, generation]")


def test_benchmark_options_take_dotted_keys_and_refuse_a_non_mapping() -> None:
    cfg = load_config(None, ["benchmark_options.hop=2", "benchmark_options.train=t.json"])
    assert cfg.benchmark_options == {"hop": 2, "train": "t.json"}
    with pytest.raises(ConfigError, match="benchmark_options"):
        load_config(None, ["benchmark_options=3"])


def test_evaluation_settings_are_checked() -> None:
    assert load_config(None, []).evaluation == ("teacher_forced", "generation")  # the main job's default
    assert load_config(None, ["generate=false"]).evaluation == ("teacher_forced",)  # an old run's flag
    for overrides, message in [
        (["evaluation=[generation]"], "teacher_forced is always part of it"),
        (["evaluation=[teacher_forced,judge]"], "judge grades generated answers; add generation"),
        (["evaluation=[teacher_forced,generation,judge]"], "name one, e.g. judge=local:smollm2"),
        (["evaluation=[teacher_forced,guess]"], "evaluation='guess': expected one of"),
        (["max_new_tokens=0"], "max_new_tokens=0: must be at least 1"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)
