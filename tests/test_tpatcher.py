"""T-Patcher on tiny models: one neuron per mistake, inactive (bit-identical) on the memory, the
paper's key initialisation, lifelong neurons restored newest first, batch edits, configs, collapse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmke.bundled import bundled_dir
from mmke.data.benchmark import load_benchmark
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError
from mmke.methods.base import layer_io
from mmke.methods.tpatcher import Patch, PatchedFFN, TPatcher
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind, Sample
from test_methods import assert_state, state
from test_methods import store as store  # the image fixture

#: The train split's locality probes: T-Patcher's memory, on which no patch may fire.
MEMORY = [
    ("london is a city in", "england"),
    ("the sign is red and the sky is", "blue"),
    ("paris is the capital of", "france"),
    ("water is", "wet"),
]


def make_case(model: LVLM, target: str = "rome", prompt: str = "what is the capital of france?") -> EditCase:
    image = ImageRef("red.png") if model.family.multimodal else None
    # its own locality probe is never memory: training on it would leak the test set
    own = (Probe(ProbeKind.TEXT_LOCALITY, "one plus one is", "two"),)
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, EditFact(prompt, target, image), own)


def train_split(with_image: bool = True) -> list[EditCase]:
    probes = [Probe(ProbeKind.TEXT_LOCALITY, p, t) for p, t in MEMORY]
    if with_image:
        probes.append(Probe(ProbeKind.IMAGE_LOCALITY, "what color is this?", "blue", ImageRef("blue.png")))
    probes.append(Probe(ProbeKind.RELIABILITY, "not a memory input", "x"))
    return [EditCase("train-0", EditType.VISUAL_ENTITY, EditFact("q", "a"), tuple(probes))]


def trained(model: LVLM, **overrides: object) -> TPatcher:
    editor = TPatcher(dict(overrides))
    editor.train(model, train_split())
    return editor


def all_logits(model: LVLM, items: list[Sample]) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model.encode(items), answer_only=False)  # (B, T, V)


def pre_activations(model: LVLM, patcher: PatchedFFN, items: list[Sample]) -> torch.Tensor:
    """Every committed neuron's pre-activation at every real token of ``items`` (M, n)."""
    batch = model.encode(items)
    x, _ = layer_io(model, patcher.inner, batch)  # (B, T, I)
    keys = torch.cat([p.keys for p in patcher.patches])  # (n, I)
    biases = torch.cat([p.biases for p in patcher.patches])  # (n,)
    return x[batch.inputs["attention_mask"].bool()].float() @ keys.T + biases


@pytest.mark.parametrize("kind", ["llava", "causal_lm", "blip2", "qwen2_vl", "idefics3"])
def test_patch_fixes_the_edit_stays_off_the_memory_and_restores_exactly(kind: str, store: ImageStore) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    memory = [Sample(p, t) for p, t in MEMORY]
    case, before, far = make_case(model), state(model), all_logits(model, memory)
    site = model.layout.mlp(-1)
    original = model.layout.module(site)
    with trained(model).applied(model, case) as edited:
        assert edited.score([case.edit])[0].exact_match
        patcher = model.layout.module(site)
        assert isinstance(patcher, PatchedFFN) and patcher.inner is original
        assert edited.details["stopped_early"] and edited.details["neurons"] == [patcher.neurons]
        # the paper's memory margin holds: every memory token's pre-activation is below -3
        acts = pre_activations(model, patcher, memory)  # (M, n)
        assert acts.max() <= -3.0
        assert torch.equal(all_logits(model, memory), far)  # no neuron fires: bit-identical outputs
        (patch,) = edited.added
        assert edited.edited_params == patch.keys.numel() + patch.biases.numel() + patch.values.numel()
    assert model.layout.module(site) is original
    assert_state(model, before)
    assert all(p.grad is None for p in model.model.parameters())


def test_wrapper_adds_relu_of_the_key_times_the_value_only_where_a_neuron_fires() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    patcher = PatchedFFN(inner)
    x = torch.randn(2, 5, 4)  # (B, T, I)
    assert torch.equal(patcher(x), inner(x))  # no neuron yet
    x[1, 3] = 10 * x[1, 3] / x[1, 3].norm()  # a query far longer than the other tokens
    query = x[1, 3]
    keys = (query / query.pow(2).sum())[None]  # (1, I): activation 1 at the query
    assert float((x.reshape(-1, 4) @ keys[0]).sort().values[-2]) < 0.5  # every other token below 0.5
    patch = Patch(keys, torch.tensor([-0.5]), torch.randn(1, 4), query[None])
    patcher.patches = [patch]
    out, base = patcher(x), inner(x)  # (B, T, D)
    fired = torch.zeros(2, 5, dtype=torch.bool)
    fired[1, 3] = True
    assert torch.equal(out[~fired], base[~fired])  # bit-identical wherever nothing fires
    expected = base[1, 3] + 0.5 * patch.values[0]  # relu(1 - 0.5) v
    torch.testing.assert_close(out[1, 3], expected)


@pytest.mark.parametrize("kind", ["llava", "causal_lm"])
def test_one_neuron_per_wrong_answer_token_keyed_where_it_is_predicted(kind: str, store: ImageStore) -> None:
    model = tiny_model(kind).bind_images(store)
    case = make_case(model, "the sky is blue")
    batch = model.encode([case.edit])
    with torch.no_grad():
        wrong = int((model.logits(batch).argmax(-1) != batch.answer_labels).sum())
    assert 2 < wrong <= 5
    with trained(model).applied(model, case) as edited:
        (patch,) = edited.added
        assert edited.details["neurons"] == [wrong] and len(patch) == wrong
        assert edited.score([case.edit])[0].exact_match
    with trained(model, max_neurons=2, steps=2).applied(model, case) as edited:
        assert edited.details["neurons"] == [2]


def test_keys_start_on_their_query_with_activation_one(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    # a vanishing step: the neuron is (almost) as initialised, firing with activation 1 at its query
    with trained(model, steps=1, lr=1e-9).applied(model, make_case(model)) as edited:
        (patch,) = edited.added
        assert edited.details["edit_activation"] == pytest.approx(1.0, abs=1e-4)
        torch.testing.assert_close(patch.keys, patch.queries / patch.queries.pow(2).sum(-1, keepdim=True))
        assert not edited.details["stopped_early"] and edited.details["steps"] == 1


def test_stacked_edits_keep_their_neurons_and_restore_newest_first(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp(-1)
    original, editor = model.layout.module(site), trained(model)
    rome, london = make_case(model, "rome"), make_case(model, "paris", "london is a city in")
    first = editor.apply(model, rome)
    patcher = model.layout.module(site)
    (kept,) = patcher.patches
    after_first = all_logits(model, [rome.edit, london.edit])
    second = editor.apply(model, london)
    assert model.layout.module(site) is patcher and patcher.inner is original  # no stacked wrapper
    assert patcher.patches[0] is kept and len(patcher.patches) == 2  # the first edit's neurons stay
    assert first.score([rome.edit])[0].exact_match and second.score([london.edit])[0].exact_match
    # the first edit's key inputs were memory for the second: its neurons stay off them
    (new,) = second.added
    assert float((kept.queries @ new.keys.T + new.biases).max()) <= -3.0
    with pytest.raises(RuntimeError, match="reverse order"):
        first.restore()
    second.restore()
    assert patcher.patches == (kept,)
    assert torch.equal(all_logits(model, [rome.edit, london.edit]), after_first)
    first.restore()
    assert model.layout.module(site) is original and patcher.patches == ()
    assert_state(model, before)


def test_an_edit_the_model_already_answers_adds_no_neuron(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor, case = trained(model), make_case(model)
    first = editor.apply(model, case)
    patcher = model.layout.module(model.layout.mlp(-1))
    with editor.applied(model, case) as again:  # one mistake, one neuron: none now
        assert again.details["neurons"] == [0] and again.edited_params == 0
        assert len(patcher.patches) == 1
    first.restore()


def test_apply_many_trains_one_neuron_set_per_case_in_one_update(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp(-1)
    editor = trained(model)
    assert type(editor).batches
    cases = [make_case(model, "rome"), make_case(model, "paris", "london is a city in")]
    with editor.apply_many(model, cases) as edited:
        assert len(edited.added) == 2 and edited.details["neurons"] == [len(p) for p in edited.added]
        assert all(score.exact_match for score in edited.score([c.edit for c in cases]))
        assert model.layout.module(site).patches == edited.added
    assert_state(model, before)


def test_tpatcher_needs_train_before_apply_and_locality_probes_in_it(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    site = model.layout.mlp(-1)
    original, editor = model.layout.module(site), TPatcher()
    assert editor.needs_train_cases and isinstance(methods.get("tpatcher")(), TPatcher)
    with pytest.raises(EditorNotReadyError, match="call train"):
        editor.apply(model, make_case(model))
    editor.train(model, [EditCase("t", EditType.VISUAL_ENTITY, EditFact("q", "a"), ())])  # no locality
    with pytest.raises(EditorNotReadyError, match="no usable locality probes"):
        editor.apply(model, make_case(model))
    assert model.layout.module(site) is original
    editor.train(model, train_split())  # the image probe is dropped: causal_lm is text-only
    assert editor.memory_pool is not None and len(editor.memory_pool) == len(MEMORY)


def test_tpatcher_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_neurons'"):
        TPatcher({"max_neuron": 3})
    for bad, match in [
        ({"max_neurons": 0}, "max_neurons must be >= 1"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": 0}, "lr must be > 0"),
        ({"amplify": -1.0}, "amplify must be > 0"),
        ({"memory_weight": -1.0}, "memory_weight must be >= 0"),
        ({"margin": -1.0}, "margin must be >= 0"),
        ({"memory_ceiling": 1.0}, "memory_ceiling must be <= 0"),
        ({"memory": 0}, "memory must be >= 1"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"clip": 0}, "clip must be > 0"),
        ({"steps": 1.5}, "steps' must be int"),
    ]:
        with pytest.raises(ConfigError, match=match):
            TPatcher(bad)
    assert TPatcher({"layer": "0", "early_stop": "false"}).config.early_stop is False


@pytest.mark.parametrize("prior_edit", [False, True])
def test_collapse_raises_with_step_and_leaves_the_model_as_it_was(
    prior_edit: bool, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp(-1)
    original, editor = model.layout.module(site), trained(model, early_stop=False, steps=5)
    first = editor.apply(model, make_case(model, "paris")) if prior_edit else None
    kept = model.layout.module(site).patches if first is not None else ()
    real_logits, calls = model.logits, []

    def logits_turning_nan(batch, answer_only=True):  # the mistakes' pass and two steps, then NaN
        calls.append(1)
        out = real_logits(batch, answer_only)
        return out if len(calls) <= 3 else out * float("nan")

    monkeypatch.setattr(model, "logits", logits_turning_nan)
    with pytest.raises(EditCollapsed, match="step 2") as err:
        editor.apply(model, make_case(model, "rome", "london is a city in"))
    assert err.value.step == 2
    if first is not None:  # the earlier edit keeps its wrapper and neurons
        assert model.layout.module(site).patches == kept
        first.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)


def test_generation_of_memory_prompts_is_unchanged(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    memory = [Sample(p, t) for p, t in MEMORY[:2]]  # two lengths: left padding
    pre = model.generate(memory, max_new_tokens=6)
    with trained(model).applied(model, make_case(model)) as edited:
        assert edited.generate(memory, max_new_tokens=6) == pre


@pytest.mark.skipif(not (bundled_dir() / "config.json").is_file(), reason="bundled world model not built")
def test_tpatcher_flips_the_world_model_and_keeps_its_text_locality() -> None:
    bench = load_benchmark("world")
    model, case = LVLM.load("world", images=ImageStore(bench.image_root)), bench.cases[0]
    editor = TPatcher()
    editor.train(model, bench.train_cases)
    reliability, locality = case.probes_of(ProbeKind.RELIABILITY), case.probes_of(ProbeKind.TEXT_LOCALITY)
    pre_rel, pre_loc = model.score(reliability), model.score(locality)
    with editor.applied(model, case) as edited:
        post_rel, post_loc = edited.score(reliability), edited.score(locality)
        assert edited.details["neurons"] == [1] and edited.details["memory_activation"] < 0
    assert not pre_rel[0].exact_match and post_rel[0].exact_match
    for a, b in zip(pre_loc, post_loc, strict=True):  # T-Loc: same predictions, same NLL
        assert torch.equal(a.argmax_ids, b.argmax_ids) and a.nll == b.nll
