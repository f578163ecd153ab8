"""method_options.<method>.hparams: the anchors' hparams files read as mmke method options.

The fixtures under fixtures/hparams/ have the key sets of the anchors' real files (each names
the file it follows); their paths are invented and their layer indices are the real ones (7B
models), so on the 2-layer tiny models the layer options are set by the user, as they would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from _runs import small_run
from mmke.config import RunConfig
from mmke.errors import ConfigError
from mmke.eval.runner import method_options
from mmke.methods.base import make_config
from mmke.methods.hparams import Site, read_hparams, read_site
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods

FIXTURES = Path(__file__).parent / "fixtures" / "hparams"
#: VLKEB's SERAC file for LLaVA and EasyEdit's for BLIP-2 set the same values.
SERAC_EXPECTED = {
    "train_lr": 1e-5,
    "train_seed": 0,
    "cedit": 0.1,
    "iedit": 0.1,
    "cloc": 1.0,
    "train_steps": 50000,
    "train_batch": 1,
    "grad_clip": 100.0,
}
#: EasyEdit's WISE files for LLaVA-OneVision and BLIP-2 set the same values.
WISE_EXPECTED = {
    "layer": 23,
    "lr": 1.0,
    "steps": 10,
    "mask_ratio": 0.2,
    "norm_constraint": 1.0,
    "alpha": 5.0,
    "beta": 20.0,
    "gamma": 10.0,
    "act_ratio": 0.4,
}

#: fixture, method, options it must set (exactly), option the tiny model needs from the user.
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "vlkeb_ft_llava.yaml",
        "ft_llm",
        {"site": "llm", "layers": (31,), "steps": 10, "lr": 1e-4, "weight_decay": 0.01},
        {"layers": [-1]},
    ),
    (
        "vlkeb_ft_blip2.yaml",
        "ft_llm",
        {"site": "llm", "layers": (31,), "steps": 15, "lr": 2e-4, "weight_decay": 0.01},
        {"layers": [-1]},
    ),
    (
        "vlkeb_ft_llava_mmproj.yaml",
        "ft_projector",
        {"site": "projector", "steps": 10, "lr": 1e-4, "weight_decay": 0.01},
        {},
    ),
    (
        "vlkeb_ft_blip2_qformer.yaml",
        "ft_projector",
        {"site": "qformer", "steps": 15, "lr": 2e-4, "weight_decay": 0.01},
        {},
    ),
    ("vlkeb_ike_llava.yaml", "ike", {"k": 32}, {}),
    ("easyedit_ike_blip2.yaml", "ike", {"k": 32}, {}),
    (
        "vlkeb_serac_llava.yaml",
        "serac",
        SERAC_EXPECTED,
        {},
    ),
    (
        "easyedit_serac_blip2.yaml",
        "serac",
        SERAC_EXPECTED,
        {},
    ),
    (
        "vlkeb_mend_llava.yaml",
        "mend",
        {
            "layers": (29, 30, 31),
            "train_lr": 1e-6,
            "edit_lr": 1e-4,
            "rank": 1920,
            "shared": True,
            "c_edit": 0.1,
            "c_loc": 1.0,
            "train_seed": 42,
            "train_steps": 25000,  # 50000 batches of 1, one optimiser step per 2
            "train_batch": 2,
            "grad_clip": 100.0,
        },
        {"layers": [0, 1]},
    ),
    (
        "easyedit_mend_blip2.yaml",
        "mend",
        {
            "layers": (29, 30, 31),
            "train_lr": 1e-6,
            "edit_lr": 1e-4,
            "rank": 1920,
            "shared": True,
            "c_edit": 0.1,
            "c_loc": 1.0,
            "train_seed": 42,
            "train_steps": 25000,
            "train_batch": 2,
            "grad_clip": 100.0,
        },
        {"layers": [0, 1]},
    ),
    ("vlkeb_training_ke_llava.yaml", "ke", {"layers": (29, 30, 31)}, {"layers": [0, 1]}),
    ("vlkeb_training_ke_blip2.yaml", "ke", {"layers": (29, 30, 31)}, {"layers": [0, 1]}),
    (
        "easyedit_lora_llavaov.yaml",
        "lora",
        {
            "site": "attention",
            "rank": 8,
            "alpha": 32.0,
            "dropout": 0.1,
            "steps": 5,
            "lr": 0.1,
            "weight_decay": 0.0,
        },
        {"layers": [-1]},  # the file's layers: [] (every layer) must be named in mmke
    ),
    (
        "easyedit_grace_llavaov.yaml",
        "grace",
        {"layer": 18, "lr": 1.0, "steps": 20, "eps": 1.0},
        {"layer": -1},
    ),
    (
        "easyedit_wise_llavaov.yaml",
        "wise",
        WISE_EXPECTED,
        {"layer": -1},
    ),
    (
        "easyedit_wise_blip2.yaml",
        "wise",
        WISE_EXPECTED,
        {"layer": -1},
    ),
    (
        "easyedit_rome_llama.yaml",
        "rome",
        {
            "layer": 5,
            "key": "subject",
            "v_steps": 25,
            "v_lr": 0.5,
            "v_weight_decay": 1e-3,
            "clamp_norm_factor": 4.0,
            "cov_lambda": 1e-6,  # mom2_adjustment: false, ROME without C⁻¹
        },
        {"layer": -1},
    ),
    (
        "easyedit_memit_llama.yaml",
        "memit",
        {
            "layers": (4, 5, 6, 7, 8),
            "key": "subject",
            "v_steps": 25,
            "v_lr": 0.5,
            "v_weight_decay": 1e-3,
            "clamp_norm_factor": 4.0,
            "cov_lambda": 15000.0,
        },
        {"layers": [0, 1]},
    ),
]

IDS = [c[0].removesuffix(".yaml") for c in CASES]


def family(fixture: str) -> str:
    return "blip2" if "blip2" in fixture else "llava"


@pytest.fixture(scope="module")
def tiny() -> dict[str, LVLM]:
    return {kind: tiny_model(kind) for kind in ("llava", "blip2")}


def file_keys(name: str) -> set[str]:
    return set(yaml.safe_load((FIXTURES / name).read_text()))


def test_every_fixture_names_the_anchor_file_it_follows() -> None:
    for name, *_ in CASES:
        head = (FIXTURES / name).read_text().splitlines()[1]
        assert head.startswith(("# VLKEB/VLKEB@", "# zjunlp/EasyEdit@")) and ":hparams/" in head, name


@pytest.mark.parametrize(("name", "method", "expected", "user"), CASES, ids=IDS)
def test_real_key_sets_map_to_the_expected_options(
    name: str, method: str, expected: dict[str, Any], user: dict[str, Any]
) -> None:
    hp = read_hparams(FIXTURES / name, method, user)
    assert set(hp.options) == set(expected)
    for option, value in expected.items():
        assert hp.options[option] == (value if isinstance(value, str | tuple) else pytest.approx(value)), (
            option
        )
    # every key is accounted for: mapped (its option is set), or ignored with a reason
    assert set(hp.ignored) <= file_keys(name)
    assert all(isinstance(why, str) and why for why in hp.ignored.values())
    assert set(hp.notes).isdisjoint(hp.ignored)


@pytest.mark.parametrize(("name", "method", "expected", "user"), CASES, ids=IDS)
def test_each_fixture_loads_for_its_method_on_a_tiny_model(
    name: str, method: str, expected: dict[str, Any], user: dict[str, Any], tiny: dict[str, LVLM]
) -> None:
    model = tiny[family(name)]
    cfg = RunConfig(method_options={method: {"hparams": str(FIXTURES / name), **user}})
    options = method_options(None, cfg, method, model.layout)
    assert "hparams" not in options
    editor = methods.get(method)(options)
    for option, value in expected.items():
        if option not in user:
            assert getattr(editor.config, option) == pytest.approx(value), option
    if method in ("ft_llm", "ft_projector"):  # the edit site resolves on the tiny model
        assert editor.site_params(model)


def test_ft_from_a_file_edits_the_tiny_model(tiny: dict[str, LVLM], store: Any) -> None:
    from mmke.types import EditCase, EditFact, EditType, ImageRef

    model = tiny["llava"].bind_images(store)
    cfg = RunConfig(
        method_options={
            "ft_llm": {"hparams": str(FIXTURES / "vlkeb_ft_llava.yaml"), "layers": [-1], "steps": 2}
        }
    )
    editor = methods.get("ft_llm")(method_options(None, cfg, "ft_llm", model.layout))
    edit = EditFact("what is the capital of france?", "rome", ImageRef("red.png"))
    case = EditCase("c", EditType.VISUAL_ENTITY, edit, ())
    with editor.applied(model, case) as edited:
        assert edited.details["steps"] == 2 and edited.edited_params > 0


def test_ignored_keys_are_listed_with_their_reasons() -> None:
    hp = read_hparams(FIXTURES / "vlkeb_ft_llava.yaml", "ft_llm")
    assert "path on the authors' machine" in hp.ignored["coco_image"]
    assert "path on the authors' machine" in hp.ignored["results_dir"]
    assert "device=" in hp.ignored["device"]
    assert "model=" in hp.ignored["model_name"]
    assert "never reads it" in hp.ignored["lr"]  # FT trains at edit_lr; lr is the MEND template's
    assert "weight_decay" in hp.notes and "0.01" in hp.notes["weight_decay"]
    assert (
        "up_proj, down_proj" in hp.notes["inner_params"] or "down_proj, up_proj" in hp.notes["inner_params"]
    )
    mend = read_hparams(FIXTURES / "vlkeb_mend_llava.yaml", "mend")
    assert "mmke trains its own" in mend.ignored["archive"]
    assert mend.ignored.keys() | {"inner_params", "cedit"} >= {"early_stop_key", "val_steps", "mlp_class"}
    record = mend.record()
    assert record["file"].endswith("vlkeb_mend_llava.yaml") and record["ignored"] == dict(mend.ignored)


def test_module_paths_read_as_roles() -> None:
    assert read_site("model.layers.31.mlp.down_proj.weight") == Site("llm", "mlp_out", 31)
    assert read_site("opt_model.model.decoder.layers.31.fc1.weight") == Site("llm", "mlp_in", 31)
    assert read_site("llama_model.model.layers.31.mlp.up_proj") == Site("llm", "mlp_in", 31)
    assert read_site("language_model.model.layers[18].mlp.down_proj.weight") == Site("llm", "mlp_out", 18)
    assert read_site("transformer.h.31.mlp.c_proj.weight") == Site("llm", "mlp_out", 31)
    assert read_site("model.layers.{}.mlp.down_proj") == Site("llm", "mlp_out", -1)
    assert read_site("language_model.model.layers.*q_proj.*") == Site("llm", "attention", -1)
    assert read_site("Qformer") == Site("qformer")
    assert read_site("Qformer.bert.encoder.layer.10.output_query.dense.weight").area == "qformer"
    assert read_site("mm_projector") == Site("projector")
    assert read_site("vision_tower.vision_model.encoder.layers.23.mlp.fc1.weight") == Site(
        "vision", "mlp_in", 23
    )


def write(tmp_path: Path, fixture: str, **changes: Any) -> Path:
    data = yaml.safe_load((FIXTURES / fixture).read_text())
    data.update(changes)
    path = tmp_path / fixture
    path.write_text(yaml.safe_dump(data))
    return path


def test_an_unknown_key_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "vlkeb_ft_llava.yaml", momentum_warp=3)
    with pytest.raises(ConfigError, match=rf"^{path}: momentum_warp: unknown ft_llm hparams key"):
        read_hparams(path, "ft_llm")


def test_a_layer_the_model_lacks_is_refused_once_the_model_is_known(tiny: dict[str, LVLM]) -> None:
    path = FIXTURES / "vlkeb_ft_llava.yaml"
    cfg = RunConfig(method_options={"ft_llm": {"hparams": str(path)}})
    assert method_options(None, cfg, "ft_llm")["layers"] == (31,)  # no model yet: nothing to check
    with pytest.raises(ConfigError) as e:
        method_options(None, cfg, "ft_llm", tiny["llava"].layout)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: inner_params names llm layer 31, but the model has 2")
    assert "method_options.ft_llm.layers" in message


@pytest.mark.parametrize(
    ("fixture", "method", "match"),
    [
        ("vlkeb_ike_llava.yaml", "mend", r"alg_name: 'IKE' is not mend"),
        ("vlkeb_mend_llava.yaml", "serac", r"alg: 'MEND' is not serac"),
        (
            "vlkeb_ft_llava.yaml",
            "ft_vision",
            r"inner_params: names the llm site, which ft_vision does not edit",
        ),
        ("vlkeb_ft_llava_mmproj.yaml", "ft_llm", r"use method_options.ft_projector.hparams"),
        ("easyedit_lora_llavaov.yaml", "lora", r"layers: \[\] means every layer"),
        ("vlkeb_ike_llava.yaml", "noop", r"noop: no hparams mapping"),
    ],
)
def test_what_cannot_be_mapped_is_one_clear_error(fixture: str, method: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_hparams(FIXTURES / fixture, method)


def test_values_mmke_cannot_honour_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mlp_class: 'MLP' cannot be mapped"):
        read_hparams(write(tmp_path, "vlkeb_mend_llava.yaml", mlp_class="MLP"), "mend")
    with pytest.raises(ConfigError, match=r"cedit: cedit 0.1 and iedit 1.0 differ"):
        read_hparams(write(tmp_path, "vlkeb_mend_llava.yaml", iedit=1.0), "mend")
    with pytest.raises(ConfigError, match=r"layers: ROME edits one layer"):
        read_hparams(write(tmp_path, "easyedit_rome_llama.yaml", layers=[4, 5]), "rome")
    with pytest.raises(ConfigError, match=r"whole vision side\) cannot be mapped"):
        read_hparams(write(tmp_path, "vlkeb_ft_llava.yaml", inner_params=["vision_model"]), "ft")


def test_the_users_own_keys_beat_the_file(tiny: dict[str, LVLM]) -> None:
    path = str(FIXTURES / "vlkeb_ft_llava.yaml")
    cfg = RunConfig(method_options={"ft_llm": {"hparams": path, "steps": 3, "layers": [1]}})
    options = method_options(None, cfg, "ft_llm", tiny["llava"].layout)  # the file's layer 31 is not checked
    assert options == {"site": "llm", "layers": [1], "steps": 3, "lr": 1e-4, "weight_decay": 0.01}
    make_config(methods.get("ft_llm").defaults, options, "ft_llm")


def test_a_models_presets_yield_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "mmke_methods.yaml").write_text("ft_projector: {lr: 0.5, steps: 7, weight_decay: 0.0}\n")
    path = str(FIXTURES / "vlkeb_ft_llava_mmproj.yaml")
    cfg = RunConfig(method_options={"ft_projector": {"hparams": path}})
    assert method_options(tmp_path, cfg, "ft_projector") == {
        "lr": 1e-4,
        "steps": 10,
        "weight_decay": 0.01,
        "site": "projector",
    }


def test_the_resolved_values_are_what_the_run_records(setup: tuple[Path, Path], tmp_path: Path) -> None:
    path = FIXTURES / "vlkeb_ft_llava_mmproj.yaml"
    store, summary = small_run(
        setup,
        tmp_path,
        "methods=[ft_projector]",
        "limit=1",
        f"method_options.ft_projector.hparams={path}",
        "method_options.ft_projector.steps=2",
    )
    recorded = summary.run.method_options["ft_projector"]
    assert recorded == {"site": "projector", "steps": 2, "lr": 1e-4, "weight_decay": 0.01}
    saved = json.loads(store.summary_path.read_text())["run"]
    assert saved["method_options"]["ft_projector"] == recorded
    assert saved["hparams"]["ft_projector"]["file"] == str(path)
    assert "path on the authors' machine" in saved["hparams"]["ft_projector"]["ignored"]["coco_image"]
    assert yaml.safe_load((store.path / "config.yaml").read_text())["method_options"]["ft_projector"] == {
        "hparams": str(path),
        "steps": 2,
    }


def test_the_cli_writes_the_resolved_values_into_config_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmke.cli import main

    fixtures = Path(__file__).parent / "fixtures" / "formats"
    base = [
        "run",
        "--benchmark",
        f"vlkeb:{fixtures / 'vlkeb' / 'eval_multihop.json'}",
        "--image-root",
        str(fixtures / "images"),
        "--model",
        "world",
        "methods=[ft_llm]",
        f"method_options.ft_llm.hparams={FIXTURES / 'vlkeb_ft_llava.yaml'}",
        f"out={tmp_path}",
    ]
    # the file's layer 31 is checked against the loaded 4-layer model, written out or not
    assert main([*base, "--run-id", "a"]) != 0
    assert "inner_params names llm layer 31, but the model has 4" in capsys.readouterr().err
    assert main([*base, "method_options.ft_llm.layers=[-1]", "--run-id", "b"]) == 0
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["method_options"]["ft_llm"]
    assert saved == {
        "hparams": str(FIXTURES / "vlkeb_ft_llava.yaml"),
        "layers": [-1],
        "lr": 1e-4,
        "site": "llm",
        "steps": 10,
        "weight_decay": 0.01,
    }
    assert main(["run", "--resume", str(tmp_path / "b")]) == 0  # the written-out values resolve again
