"""UltraEdit on tiny models: the shift is the ridge solution for the keys and value targets of one
forward/backward pass, the lifelong statistics are the exact moments of every feature seen and
roll back on restore, stacking and batches, the cold start, configs and collapse."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmke.bundled import bundled_dir
from mmke.data.benchmark import load_benchmark
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError
from mmke.methods.base import trainable_only
from mmke.methods.ultraedit import Moments, UltraEdit, UltraEdited, ridge_shift, value_targets
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, ProbeKind
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

FAST = {"lr": 1e-2}  # tiny models: MLP width 128, so a larger step than the paper's 1e-6 for 7B
TRAIN_FACTS = [
    ("berlin", "what is the capital of germany?"),
    ("tokyo", "what city is in japan?"),
    ("madrid", "the capital of spain is"),
]


def cases_for(model: LVLM) -> tuple[list[EditCase], EditCase, EditCase]:
    """Warm-up cases and two edits (a one-token and a longer target)."""
    image = "red.png" if model.family.multimodal else None
    train = [make_case(target=t, prompt=p, image=image) for t, p in TRAIN_FACTS]
    return train, make_case(image=image), make_case("lisbon", image, "which city is in portugal?")


def ready(model: LVLM, train: list[EditCase], **config: Any) -> UltraEdit:
    editor = UltraEdit({**FAST, **config})
    editor.train(model, train)
    return editor


def features_alone(model: LVLM, site: str, case: EditCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs (n, I) and the gradient of the case's mean NLL at its outputs (n, D), at the
    positions that predict answer tokens: computed here with retained grads, not the editor's hooks."""
    batch = model.encode([case.edit])
    _, cols = batch.answer_positions
    module = model.layout.module(site)
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        out.retain_grad()
        seen["x"], seen["y"] = args[0], out

    handle = module.register_forward_hook(grab)
    try:
        with trainable_only(model.model, {f"{site}.weight": module.weight}), torch.enable_grad():
            model.loss(batch).backward()
    finally:
        handle.remove()
        module.weight.grad = None
    assert seen["y"].grad is not None
    return seen["x"][0, cols - 1].detach().float(), seen["y"].grad[0, cols - 1].float()


def features(model: LVLM, site: str, cases: list[EditCase]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [features_alone(model, site, c) for c in cases]
    return torch.cat([k for k, _ in pairs]), torch.cat([g for _, g in pairs])


def assert_moments(moments: Moments, keys: torch.Tensor, grads: torch.Tensor) -> None:
    """``moments`` are the count, mean and sample std of every feature row given (in float64)."""
    z = torch.cat([keys, grads], dim=-1).double()  # (n, F)
    assert moments.count == z.shape[0]
    torch.testing.assert_close(moments.mean, z.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(moments.std, z.std(0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["llava", "causal_lm"])
def test_the_shift_is_the_ridge_solution_for_the_keys_and_value_targets_of_the_edit(
    kind: str, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    train, case, _ = cases_for(model)
    editor = ready(model, train, ridge=0.5)
    (site,) = editor.sites(model)  # default (-3, -2): layer 0 of a 2-layer model
    assert site == model.layout.mlp_out(0)
    keys, grads = features(model, site, [case])  # on the model before the edit
    old = model.model.get_parameter(f"{site}.weight").detach().clone()  # (D, I)
    with editor.applied(model, case) as edited:
        shift = (model.model.get_parameter(f"{site}.weight") - old).double()  # (D, I)
        moments = editor.statistics(model)[site]
        z = moments.normalise(torch.cat([keys, grads], dim=-1))  # (n, I + D)
        k_hat, g_hat = z[:, : keys.shape[1]], z[:, keys.shape[1] :]
        values = -FAST["lr"] * (k_hat**2).sum(-1, keepdim=True) * g_hat  # (n, D): the paper's targets
        torch.testing.assert_close(value_targets(moments, keys, grads, FAST["lr"]), values)
        k = keys.double()
        lhs = (k.T @ k + 0.5 * torch.eye(k.shape[1], dtype=torch.float64)) @ shift.T  # (I, D)
        rhs = k.T @ values  # (I, D)
        assert shift.abs().max() > 0
        assert (lhs - rhs).norm() / rhs.norm() < 1e-4  # the normal equations of the ridge problem
        assert edited.details["tokens"] == keys.shape[0] and edited.details["layers"] == [0]


def test_ridge_shift_solves_the_same_problem_in_either_form() -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (3, 12):  # fewer keys than inputs (dual form), then more (primal)
        keys, values = torch.randn(n, 8, generator=gen), torch.randn(n, 5, generator=gen)
        shift = ridge_shift(keys, values, 2.0)  # (D, I)
        k = keys.double()
        lhs = (k.T @ k + 2.0 * torch.eye(8, dtype=torch.float64)) @ shift.T
        torch.testing.assert_close(lhs, k.T @ values.double())


def test_moments_are_exact_for_any_split_of_the_stream() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(9, 4, generator=gen) * 3 + 1
    one = Moments.empty(4, "cpu").update(z[:1])
    assert one.count == 1 and torch.equal(one.std, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(one.normalise(z[:1]), torch.zeros(1, 4, dtype=torch.float64))  # its own mean
    split = one.update(z[1:4]).update(z[4:])
    torch.testing.assert_close(split.mean, z.double().mean(0))
    torch.testing.assert_close(split.std, z.double().std(0))


def test_the_statistics_gather_every_edit_so_far_and_roll_back_on_restore(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    train, first, second = cases_for(model)
    editor = ready(model, train)
    (site,) = editor.sites(model)
    warm = editor.statistics(model)[site]
    wk, wg = features(model, site, train)
    assert_moments(warm, wk, wg)  # warm-up ran batched: the same features as one case at a time
    before, pre = state(model), model.score([second.edit])[0].nll
    k1, g1 = features(model, site, [first])
    a = editor.apply(model, first)
    after_first = editor.statistics(model)[site]
    assert_moments(after_first, torch.cat([wk, k1]), torch.cat([wg, g1]))
    k2, g2 = features(model, site, [second])  # the second turn reads the model as the first left it
    b = editor.apply(model, second)
    assert_moments(editor.statistics(model)[site], torch.cat([wk, k1, k2]), torch.cat([wg, g1, g2]))
    assert len(k2) > 1 and b.details["seen"] == warm.count + len(k1) + len(k2)
    assert model.score([second.edit])[0].nll < pre - 0.1
    with pytest.raises(RuntimeError, match="newest first"):
        a.restore()
    b.restore()
    assert editor.statistics(model)[site] is after_first
    a.restore()
    assert editor.statistics(model)[site] is warm
    assert_state(model, before)


def test_apply_many_writes_a_batch_in_one_turn_and_restores_it(store: ImageStore) -> None:
    model = tiny_model("llava", seed=0).bind_images(store)
    train, first, second = cases_for(model)
    editor = ready(model, train)
    (site,) = editor.sites(model)
    warm, before = editor.statistics(model)[site], state(model)
    pre = [model.score([c.edit])[0].nll for c in (first, second)]
    (k1, g1), (k2, g2) = features_alone(model, site, first), features_alone(model, site, second)
    with editor.apply_many(model, [first, second]) as edited:
        assert isinstance(edited, UltraEdited) and edited.details["cases"] == 2
        assert set(edited.snapshot) == {f"{site}.weight"}
        moments = editor.statistics(model)[site]  # one update with both cases, read on the same model
        assert moments.count == warm.count + len(k1) + len(k2)
        z = torch.cat([torch.cat([k1, k2]), torch.cat([g1, g2])], dim=-1).double()
        expected = warm.update(z)
        torch.testing.assert_close(moments.mean, expected.mean, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(moments.m2, expected.m2, rtol=1e-4, atol=1e-7)
        post = [s.nll for s in edited.score([first.edit, second.edit])]
        assert all(b < a - 0.1 for a, b in zip(pre, post, strict=True)), (pre, post)
    assert editor.statistics(model)[site] is warm
    assert_state(model, before)
    assert UltraEdit.batches and methods.get("ultraedit") is UltraEdit


def test_the_paper_cold_start_cannot_write_a_lone_one_token_edit(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    _, first, second = cases_for(model)
    editor = UltraEdit({**FAST, "warmup": 0})
    assert not editor.needs_train_cases  # no train step: the paper's empty statistics
    before = state(model)
    with editor.applied(model, first) as edited:  # its one feature is its own mean: zero targets
        assert edited.details["tokens"] == 1 and edited.details["seen"] == 1
        assert edited.details["shift_norms"] == [0.0]
        assert_state(model, before)
        with editor.applied(model, second) as later:  # the stream's second turn has statistics
            assert later.details["seen"] > 2 and later.details["shift_norms"][0] > 0
    assert_state(model, before)
    assert editor.statistics(model) == {}


def test_ultraedit_needs_its_warm_up_unless_told_to_start_cold(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    _, case, _ = cases_for(model)
    editor = UltraEdit(FAST)
    assert editor.needs_train_cases
    with pytest.raises(EditorNotReadyError, match="warmup=0"):
        editor.apply(model, case)
    with pytest.raises(EditorNotReadyError, match="no train case"):
        editor.train(model, [])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"layers": []}, "at least one layer"),
        ({"lr": 0}, "lr must be"),
        ({"lr": float("inf")}, "lr must be"),
        ({"ridge": -1}, "ridge must be"),
        ({"warmup": -1}, "warmup must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"lamda": 1.0}, "unknown ultraedit config key"),
    ],
)
def test_ultraedit_config_is_validated(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UltraEdit(override)


def test_ultraedit_collapse_leaves_model_and_statistics_as_they_were(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    train, case, _ = cases_for(model)
    editor = ready(model, train, lr=1e300)  # the targets overflow to inf: the shift is not finite
    warm, before = editor.statistics(model), state(model)
    with pytest.raises(EditCollapsed, match="non-finite"):
        editor.apply(model, case)
    assert_state(model, before)
    assert all(editor.statistics(model)[site] is moments for site, moments in warm.items())


@pytest.mark.skipif(not (bundled_dir() / "config.json").is_file(), reason="bundled world model not built")
def test_ultraedit_flips_the_world_model_with_its_world_settings() -> None:
    bench = load_benchmark("world")
    model, case = LVLM.load("world", images=ImageStore(bench.image_root)), bench.cases[0]
    editor = UltraEdit({"lr": 0.02})  # the world model's mmke_methods.yaml section
    editor.train(model, bench.train_cases)
    reliability = case.probes_of(ProbeKind.RELIABILITY)
    before, pre = state(model), model.score(reliability)
    with editor.applied(model, case) as edited:
        post = edited.score(reliability)
        assert edited.details["layers"] == [1, 2]  # (-3, -2) of its 4 layers
    assert not pre[0].exact_match and post[0].exact_match
    assert_state(model, before)
