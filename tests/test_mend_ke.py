"""MEND and KE on tiny models: edits only their weights, lower the edit NLL, restore exactly, stack,
meta-train, collapse safely and reload from disk; plus the shared mechanism in ``_hyper``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError, ParamEdited
from mmke.methods._hyper import HyperEditor, edit_sites, gradient_factors, site_weights, substituted
from mmke.methods.ke import KE
from mmke.methods.mend import MEND
from mmke.methods.trainable import model_fingerprint
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

EDITORS = [MEND, KE]
FAST = {"train_steps": 4, "train_batch": 2, "checkpoint_every": 100}
KINDS = ["llava", "causal_lm", "blip2", "qwen2_vl", "idefics3"]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cases_for(model: LVLM) -> list[EditCase]:
    image = "red.png" if model.family.multimodal else None
    return [
        make_case("rome", image=image),
        make_case("berlin", image=image, prompt="what is the capital of germany?"),
        make_case("oslo", image=image, prompt="what city is in norway?"),
    ]


def trained(cls: type[HyperEditor], model: LVLM, out: Path, **over: object) -> HyperEditor:
    editor = cls({**FAST, **over})
    editor.fit(model, cases_for(model), out)
    return editor


@pytest.mark.parametrize("cls", EDITORS)
@pytest.mark.parametrize("kind", KINDS)
def test_edit_changes_only_its_weights_lowers_the_nll_and_restores(
    kind: str, cls: type[HyperEditor], store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model(kind).bind_images(store)
    editor = trained(cls, model, tmp_path / "ed")
    case = cases_for(model)[0]
    before, nll = state(model), model.score([case.edit])[0].nll
    expected = set(site_weights(model, edit_sites(model, editor.config.layers)))
    with editor.applied(model, case) as edited:
        assert isinstance(edited, ParamEdited) and set(edited.snapshot) == expected
        now = model.model.state_dict()
        assert {k for k in before if not torch.equal(now[k], before[k])} == expected
        assert edited.score([case.edit])[0].nll < nll
    assert_state(model, before)


def test_default_layers_are_deduplicated_on_a_two_layer_model() -> None:
    model = tiny_model("llava")
    sites = edit_sites(model, (-3, -2, -1))
    assert sites == edit_sites(model, (0, 1))
    assert [s.rsplit(".", 1)[1] for s in sites[:3]] == ["gate_proj", "up_proj", "down_proj"]
    opt = [s.rsplit(".", 2)[-2:] for s in edit_sites(tiny_model("blip2"), (-1,))]
    assert opt == [["1", "fc1"], ["1", "fc2"]]  # OPT has no MLP block: both of its MLP linears


@pytest.mark.parametrize("cls", EDITORS)
def test_apply_before_training_says_how_to_train(cls: type[HyperEditor], store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    with pytest.raises(EditorNotReadyError, match="train-editor"):
        cls().apply(model, make_case(image=None))


@pytest.mark.parametrize("cls", EDITORS)
def test_sequential_edits_stack_and_restore_in_reverse(
    cls: type[HyperEditor], store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor = trained(cls, model, tmp_path / "ed")
    first_case, second_case = cases_for(model)[:2]
    before = state(model)
    first = editor.apply(model, first_case)
    after_first = state(model)
    second = editor.apply(model, second_case)  # computed on the already-edited model
    assert set(second.snapshot) == set(first.snapshot)
    assert any(not torch.equal(after_first[k], v) for k, v in model.model.state_dict().items())
    second.restore()
    assert_state(model, after_first)
    first.restore()
    assert_state(model, before)


@pytest.mark.parametrize("cls", EDITORS)
def test_meta_training_lowers_the_meta_loss(
    cls: type[HyperEditor], store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model("llava").bind_images(store)
    losses: list[float] = []
    editor = cls({"train_steps": 30, "train_batch": 1, "checkpoint_every": 100})
    editor.fit(model, cases_for(model)[:1], tmp_path, progress=lambda s, t, loss, st: losses.append(loss))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("cls", EDITORS)
def test_a_saved_editor_reloads_and_gives_the_same_update(
    cls: type[HyperEditor], store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model("qwen2_vl").bind_images(store)
    editor = trained(cls, model, tmp_path / "ed")
    case = cases_for(model)[1]
    with editor.applied(model, case) as edited:
        want = state(model)
        assert edited.details["delta_norm"]
    again = cls({**FAST, "editor_path": str(tmp_path / "ed")})
    with again.applied(model, case):
        now = model.model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in want.items())


def test_a_diverging_update_is_restored_and_reported(store: ImageStore, tmp_path: Path) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor = trained(MEND, model, tmp_path / "ed")
    with torch.no_grad():
        editor.networks(model).log_lrs.fill_(float("inf"))  # type: ignore[union-attr]
    before = state(model)
    with pytest.raises(EditCollapsed, match="non-finite"):
        editor.apply(model, make_case(image=None))
    assert_state(model, before)


def test_gradient_factors_give_the_weight_gradient(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    case = make_case()
    sites = edit_sites(model, (-1,))
    batch = model.encode([case.edit])
    factors = gradient_factors(model, sites, batch)
    weights = site_weights(model, sites)
    grads = torch.autograd.grad(model.loss(batch), list(weights.values()))
    for (site, f), g in zip(factors.items(), grads, strict=True):
        torch.testing.assert_close(f.grad(), g, rtol=1e-4, atol=1e-6, msg=site)


def test_substituted_weights_are_used_and_put_back_in_order(store: ImageStore) -> None:
    model = tiny_model("blip2").bind_images(store)  # OPT fc2 has a bias: parameter order must survive
    name = next(iter(site_weights(model, edit_sites(model, (-1,)))))
    keys, fingerprint = list(model.model.state_dict()), model_fingerprint(model)
    batch = model.encode([make_case().edit])
    base = model.loss(batch)
    delta = torch.zeros_like(model.model.get_parameter(name), requires_grad=True)
    with substituted(model.model, {name: model.model.get_parameter(name).detach() + delta}):
        loss = model.loss(batch)
    (grad,) = torch.autograd.grad(loss, delta)
    torch.testing.assert_close(loss, base)
    assert grad.abs().sum() > 0
    assert list(model.model.state_dict()) == keys and model_fingerprint(model) == fingerprint
    assert isinstance(model.model.get_parameter(name), torch.nn.Parameter)


def test_registered_and_configs_checked() -> None:
    assert methods.get("mend") is MEND and methods.get("ke") is KE
    with pytest.raises(ConfigError, match="rank"):
        MEND({"rank": 0})
    with pytest.raises(ConfigError, match="max_scale"):
        KE({"max_scale": 0.0})
    with pytest.raises(ConfigError, match="layers"):
        MEND({"layers": []})
    with pytest.raises(ConfigError, match="train_steps"):
        KE({"train_steps": 0})
