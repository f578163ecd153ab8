"""VisEdit on tiny models: the adapter edits visual tokens only, image-free items are untouched, the edit
holds after meta-training, stacked and batched edits restore exactly, influence, save/load, configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods.visedit import (
    EditSignal,
    VisEdit,
    VisualEditAdapter,
    _influence,
)
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.types import Sample
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

SMALL = {"train_steps": 30, "train_lr": 1e-3, "mid_dim": 64, "mapper_dim": 64, "samples": 8}
FACTS = (("berlin", "what is the capital of germany?"), ("tokyo", "what city is in japan?"))
TEXT_ONLY = [Sample("london is a city in", "england"), Sample("the sky is", "blue")]


def train_cases(model: LVLM) -> list[Any]:
    image = "red.png" if model.family.multimodal else None
    other = "blue.png" if model.family.multimodal else None
    return [make_case(image=image), *(make_case(t, other, p) for t, p in FACTS)]


@pytest.fixture(scope="module")
def trained(store: ImageStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[LVLM, VisEdit, Path]:
    model = tiny_model("llava", seed=0).bind_images(store)
    editor = VisEdit(SMALL)
    out = tmp_path_factory.mktemp("visedit")
    editor.fit(model, train_cases(model), out)
    return model, editor, out


def layer_output(model: LVLM, editor: VisEdit, items: list[Any]) -> torch.Tensor:
    """The edit layer's output (B, T, D) after every hook on it (the adapter's update included)."""
    seen: dict[str, torch.Tensor] = {}
    module = model.layout.module(model.layout.layer(editor.edit_layer(model)))

    def grab(mod: nn.Module, args: Any, out: Any) -> None:
        seen["y"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = module.register_forward_hook(grab)  # registered last: sees the adapted output
    try:
        with torch.no_grad():
            model.logits(model.encode(items))
    finally:
        handle.remove()
    return seen["y"]


def all_logits(model: LVLM, items: list[Any]) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model.encode(items), answer_only=False)  # (B, T, V)


def test_the_adapter_changes_visual_tokens_and_leaves_text_tokens_bit_identical(trained: Any) -> None:
    model, editor, _ = trained
    case = make_case()
    items = [case.edit]
    ids = model.encode(items).inputs["input_ids"]  # (1, T)
    visual = ids == model.image_token_id  # (1, T)
    assert 0 < int(visual.sum()) < ids.numel()
    before = layer_output(model, editor, items)
    with editor.applied(model, case):
        after = layer_output(model, editor, items)
    assert torch.equal(after[~visual], before[~visual])  # text tokens: untouched
    assert not torch.equal(after[visual], before[visual])  # visual tokens: edited
    moved = (after - before).norm(dim=-1)[visual]  # (n,)
    assert bool((moved > 0).all())


def test_an_item_without_an_image_scores_exactly_as_the_unedited_model(trained: Any) -> None:
    model, editor, _ = trained
    far = all_logits(model, TEXT_ONLY)
    with editor.applied(model, make_case()) as edited:
        assert torch.equal(all_logits(model, TEXT_ONLY), far)
        scored = edited.score(TEXT_ONLY)
    assert [s.nll for s in scored] == [s.nll for s in model.score(TEXT_ONLY)]


def test_the_gate_is_the_influence_mapper_and_weighs_each_visual_token(trained: Any) -> None:
    model, editor, _ = trained
    adapter = editor.networks(model)
    assert isinstance(adapter, VisualEditAdapter)
    tokens, reps = torch.randn(5, 64), torch.randn(7, 64)
    signal = EditSignal(reps, reps[3])
    gate = adapter.gate(tokens, signal)  # (5, 1)
    assert gate.shape == (5, 1) and bool(((gate > 0) & (gate < 1)).all())
    assert torch.allclose(adapter(tokens, signal), adapter(tokens, signal) / gate * gate)
    ungated = VisualEditAdapter(64, 64, 8, 64, influence=False)
    assert torch.equal(ungated.gate(tokens, signal), torch.ones(5, 1))


def test_influence_goes_to_the_token_the_prompt_end_reads() -> None:
    """The reference's attribution: noise on a token that the last prompt token reads moves its output."""

    class ReadsToken(nn.Module):  # every position's output is token 2's input
        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
            return hidden_states[:, 2:3].expand_as(hidden_states) * 1.0, None

    module = ReadsToken()
    hidden = torch.randn(1, 6, 16)
    out = module(hidden_states=hidden)
    calls = [(module, (), {"hidden_states": hidden}, out)]
    pos, valid = torch.tensor([[0, 1, 2, 3]]), torch.ones(1, 4, dtype=torch.bool)
    share = _influence(calls, torch.tensor([0]), torch.tensor([5]), pos, valid, 0.7, torch.Generator())
    assert torch.allclose(share.sum(1), torch.ones(1))
    assert float(share[0, 2]) == pytest.approx(1.0, abs=1e-4)  # the others: rounding only


def test_edit_nll_falls_after_training(trained: Any) -> None:
    model, editor, _ = trained
    case = make_case()
    (pre,) = model.score([case.edit])
    with editor.applied(model, case) as edited:
        (post,) = edited.score([case.edit])
    assert post.nll < pre.nll - 0.5, (pre.nll, post.nll)


def test_stacked_edits_each_remove_their_own_part_in_any_order(trained: Any) -> None:
    model, editor, _ = trained
    first, second = make_case(), make_case("berlin", "blue.png", FACTS[0][1])
    before, hooks = state(model), _hook_count(model)
    base = all_logits(model, [first.edit, second.edit])
    (pre,) = model.score([first.edit])
    one = editor.apply(model, first)
    (alone,) = one.score([first.edit])
    after_one = all_logits(model, [first.edit, second.edit])
    two = editor.apply(model, second)
    assert len(editor._sites[id(model)].signals) == 2 and _hook_count(model) == hooks + 3
    assert two.details["live_signals"] == 2
    (stacked,) = two.score([first.edit])
    assert stacked.nll < pre.nll  # the first edit still holds under the second
    assert stacked.nll != alone.nll  # and the second adds its own term
    one.restore()  # out of order: each handle takes out only its own signal
    assert len(editor._sites[id(model)].signals) == 1
    two.restore()
    assert id(model) not in editor._sites and _hook_count(model) == hooks
    assert torch.equal(all_logits(model, [first.edit, second.edit]), base)
    assert_state(model, before)
    three = editor.apply(model, first)  # reverse order too
    four = editor.apply(model, second)
    four.restore()
    assert torch.equal(all_logits(model, [first.edit, second.edit]), after_one)
    three.restore()
    assert torch.equal(all_logits(model, [first.edit, second.edit]), base)
    one.restore()  # idempotent
    with pytest.raises(RuntimeError, match="already restored"):
        one.score([first.edit])


def test_apply_many_writes_both_edits_in_one_update_like_stacking(trained: Any) -> None:
    model, editor, _ = trained
    cases = [make_case(), make_case("berlin", "blue.png", FACTS[0][1])]
    items = [c.edit for c in cases]
    with editor.applied(model, cases[0]), editor.applied(model, cases[1]):
        stacked = all_logits(model, items)
    with editor.apply_many(model, cases) as edited:
        assert edited.details["edits"] == 2
        assert edited.edited_params == sum(s.floats for s in edited.signals)
        batched = all_logits(model, items)
    assert torch.allclose(batched, stacked, atol=1e-5)
    assert VisEdit.batches


def test_generation_runs_through_the_edit(trained: Any) -> None:
    model, editor, _ = trained
    case = make_case()
    with editor.applied(model, case) as edited:
        (text,) = edited.generate([case.edit], max_new_tokens=3)
    assert isinstance(text, str)


def test_a_saved_editor_reloads_and_edits_the_same(trained: Any) -> None:
    model, editor, out = trained
    assert (out / "editor.safetensors").is_file() and (out / "editor.json").is_file()
    again = VisEdit({**SMALL, "editor_path": str(out)})
    again.train(model, [])  # finds the saved editor: no training
    loaded, original = again.networks(model).state_dict(), editor.networks(model).state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    case = make_case()
    with editor.applied(model, case) as a:
        (x,) = a.score([case.edit])
    with again.applied(model, case) as b:
        (y,) = b.score([case.edit])
    assert x.nll == y.nll


def test_text_only_models_edit_every_token(store: ImageStore, tmp_path: Path) -> None:
    model = tiny_model("causal_lm", seed=0)
    editor = VisEdit(SMALL)
    cases = train_cases(model)
    editor.fit(model, cases, tmp_path)
    assert model.image_token_id is None
    before = state(model)
    (pre,) = model.score([cases[0].edit])
    with editor.applied(model, cases[0]) as edited:
        (post,) = edited.score([cases[0].edit])
    assert post.nll < pre.nll - 0.5
    assert_state(model, before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mid_dim": 100, "heads": 8}, "must divide mid_dim"),
        ({"samples": 0}, ">= 1"),
        ({"loc_lambda": -1.0}, ">= 0"),
        ({"rel_lambda": 0.0, "gen_lambda": 0.0}, "rel_lambda"),
        ({"noise": 0.0}, "noise"),
        ({"train_steps": 0}, ">= 1"),
        ({"mid_dim": "wide"}, "must be int"),
        ({"heads_n": 8}, "did you mean 'heads'"),
    ],
)
def test_config_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        VisEdit(overrides)


def test_model_dependent_errors(store: ImageStore) -> None:
    model = tiny_model("llava", seed=0).bind_images(store)  # 2 decoder layers, hidden size 64
    with pytest.raises(ConfigError, match="last decoder layer"):
        VisEdit({"layer": -1}).build(model)
    with pytest.raises(ConfigError, match="hidden size"):
        VisEdit({"heads": 6, "mid_dim": 60}).build(model)
    assert VisEdit().edit_layer(model) == 0
    assert VisEdit().trace_layers(model) == [model.layout.attention(1)]


def _hook_count(model: LVLM) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())
