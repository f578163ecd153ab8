"""LoRA on tiny models: edits per family and site, exact unwrap, stacking, collapse, configs, world model."""

from __future__ import annotations

import sys

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods.base import EditCollapsed, EditorNotReadyError
from mmke.methods.lora import LoRA, LoRAConfig
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import ProbeKind
from test_methods import assert_state, edit_nll, flags, make_case, state
from test_methods import store as store  # the fixture, re-exported for pytest

LoraLayer = pytest.importorskip(
    "peft.tuners.lora.layer", reason="peft (mmke[lora]) is not installed"
).LoraLayer

FAST = {"lr": 5e-2, "steps": 20}  # tiny random models need a large step to move in 20 steps
KINDS = ("llava", "blip2", "qwen2_vl", "idefics3", "causal_lm")


def tree(model: LVLM) -> dict[str, type]:
    return {name: type(m) for name, m in model.model.named_modules()}


def modules(model: LVLM) -> dict[str, int]:
    return {name: id(m) for name, m in model.model.named_modules()}


def assert_original(model: LVLM, before: dict[str, torch.Tensor], ids: dict[str, int]) -> None:
    assert_state(model, before)
    assert modules(model) == ids  # the very same module objects are back in place
    assert not any("lora" in name for name in ids)
    assert not any(isinstance(m, LoraLayer) for m in model.model.modules())


@pytest.mark.parametrize("site", ["llm", "attention"])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_edits_and_unwraps_exactly(kind: str, site: str, store: ImageStore) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    before, ids, types, grad_flags = state(model), modules(model), tree(model), flags(model)
    pre = edit_nll(model, case)
    editor = LoRA({"site": site, **FAST})
    wrapped = editor.site_linears(model.layout)
    with editor.applied(model, case) as edited:
        (score,) = edited.score([case.edit])
        assert score.nll < 0.3 * pre, f"{kind}/{site}: nll {pre:.3f} -> {score.nll:.3f}"
        assert all(isinstance(model.layout.module(n), LoraLayer) for n in wrapped)
        rank, n_params = editor.config.rank, edited.edited_params
        assert n_params == sum(rank * (m.in_features + m.out_features) for m in _bases(model, wrapped))
        assert len(edited.details["losses"]) == FAST["steps"]
        # base weights untouched while the edit is live: they only moved under ``base_layer``
        now = {
            k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if "lora_" not in k
        }
        assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)
    assert tree(model) == types
    assert_original(model, before, ids)
    assert flags(model) == grad_flags
    assert all(p.grad is None for p in model.model.parameters())


def _bases(model: LVLM, names: list[str]) -> list[torch.nn.Linear]:
    return [model.layout.module(n).get_base_layer() for n in names]


def test_a_fresh_edit_starts_from_the_unedited_model(store: ImageStore) -> None:
    model, case = tiny_model("llava").bind_images(store), make_case()
    base = model.score(case.probes).nll
    with LoRA({"steps": 1, "lr": 1e-9}).applied(model, case) as edited:
        assert edited.score(case.probes).nll == pytest.approx(base, abs=1e-5)  # B = 0 at start


def test_stacked_edits_restore_in_reverse_order(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    original, ids = state(model), modules(model)
    editor = LoRA(FAST)
    first = editor.apply(model, make_case("rome"))
    after_first, ids_first = state(model), modules(model)
    second = editor.apply(model, make_case("london", image="blue.png"))
    assert second.edited_params == first.edited_params  # wrapped the wrappers, not their adapters
    assert [p.site for p in second.parts] == [p.site for p in first.parts]
    assert edit_nll(model, make_case("london", image="blue.png")) < 0.5
    second.restore()
    assert_state(model, after_first)
    assert modules(model) == ids_first
    first.restore()
    assert_original(model, original, ids)


def test_collapse_raises_and_unwraps(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llava").bind_images(store)
    before, ids = state(model), modules(model)
    real_loss, calls = model.loss, []

    def loss_turning_nan(batch):  # two real steps move the adapters, then the loss is NaN
        calls.append(1)
        loss = real_loss(batch)
        return loss if len(calls) <= 2 else loss * float("nan")

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    with pytest.raises(EditCollapsed, match="step 2") as err:
        LoRA(FAST).apply(model, make_case())
    assert err.value.step == 2
    assert_original(model, before, ids)


def test_same_seed_same_edit_and_global_rng_untouched(store: ImageStore) -> None:
    model, case = tiny_model("causal_lm"), make_case(image=None)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    losses = []
    for _ in range(2):
        with LoRA({"steps": 3}).applied(model, case) as edited:
            losses.append(edited.details["losses"])
    assert losses[0] == losses[1]
    assert torch.equal(torch.get_rng_state(), rng)


def test_dropout_trains_but_scoring_is_deterministic(store: ImageStore) -> None:
    model, case = tiny_model("causal_lm"), make_case(image=None)
    with LoRA({"dropout": 0.5, "steps": 3}).applied(model, case) as edited:
        assert edited.score([case.edit]).nll == edited.score([case.edit]).nll
        assert all(not p.replacement.lora_dropout.training for p in edited.parts)


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        LoRA({"rnak": 4})
    with pytest.raises(ConfigError, match="site"):
        LoRA({"site": "vision"})
    with pytest.raises(ConfigError, match="rank"):
        LoRA({"rank": 0})
    assert LoRA({"layers": [0, 1], "alpha": "16"}).config == LoRAConfig(layers=(0, 1), alpha=16.0)
    assert methods.get("lora") is LoRA


def test_missing_peft_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # ``import peft`` now raises ImportError
    with pytest.raises(EditorNotReadyError, match=r"mmke\[lora\]"):
        LoRA().apply(tiny_model("causal_lm"), make_case(image=None))


def test_world_model_reliability_flips() -> None:
    from mmke.data.benchmark import load_benchmark

    bench = load_benchmark("world")
    model, case = LVLM.load("world", images=ImageStore(bench.image_root)), bench.cases[0]
    reliability = [p for p in case.probes if p.kind == ProbeKind.RELIABILITY]
    assert not any(model.score(reliability).exact_match)
    with LoRA().applied(model, case) as edited:
        assert all(edited.score(reliability).exact_match)
