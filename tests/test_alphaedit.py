"""AlphaEdit on tiny models: updates live in C's null space, sequential edits avoid earlier keys,
the paper's update equation, stacking with exact restore of weights and accumulation, batches, configs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError, _keyvalue
from mmke.methods import alphaedit as alphaedit_module
from mmke.methods._keyvalue import io_at, key_position
from mmke.methods.alphaedit import AlphaEdit, NullSpace, NullSpaceEdited, null_basis, null_space_update
from mmke.methods.memit import Memit
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

FAST = {"v_steps": 30, "v_lr": 0.5}
TRAIN_FACTS = [
    ("berlin", "what is the capital of germany?"),
    ("tokyo", "what city is in japan?"),
    ("madrid", "the capital of spain is"),
]
#: three edits with different prompts, for stacking
EDITS = [
    ("rome", "what is the capital of france?"),
    ("paris", "the capital of italy is"),
    ("lisbon", "which city is in portugal?"),
]


@pytest.fixture(autouse=True)
def stats_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its statistics under its own cache dir (ROME's folder: the cache is shared)."""
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rome"


def image_for(model: LVLM) -> str | None:
    return "red.png" if model.family.multimodal else None


def trained(model: LVLM, config: dict | None = None) -> AlphaEdit:
    editor = AlphaEdit({**FAST, **(config or {})})
    editor.train(model, [make_case(t, image_for(model), p) for t, p in TRAIN_FACTS])
    return editor


def edit(model: LVLM, index: int) -> EditCase:
    target, prompt = EDITS[index]
    return make_case(target, image_for(model), prompt)


def weights(model: LVLM, editor: AlphaEdit) -> list[torch.Tensor]:
    return [
        model.model.get_parameter(f"{site}.weight").detach().double().clone() for site in editor.sites(model)
    ]


def key_of(model: LVLM, site: str, case: EditCase) -> torch.Tensor:
    """The case's key (I,) at ``site`` on the model as it is now."""
    batch = model.encode([case.edit])
    position = key_position(batch, case.edit.prompt, "subject", case.subject)
    return io_at(model, model.layout.module(site), batch, position)[0].double()


# --- the defining property ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal_lm", "llava"])
def test_the_update_leaves_the_preserved_subspace_untouched_and_lands_the_edit(
    kind: str, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    editor = trained(model)
    case = edit(model, 0)
    (pre,) = model.score([case.edit])
    covs = editor._stats.get(model, editor.sites(model))
    before, old = state(model), weights(model, editor)
    with editor.applied(model, case) as edited:
        (post,) = edited.score([case.edit])
        assert post.nll < pre.nll - 1.0 and post.exact_match, f"{kind}: nll {pre.nll:.3f} -> {post.nll:.3f}"
        for cov, w_old, w_new in zip(covs, old, weights(model, editor), strict=True):
            delta = w_new - w_old  # (D, I)
            vectors = torch.linalg.eigh(cov)[1]  # ascending eigenvalues
            top = vectors[:, -8:]  # (I, 8): the corpus' main key directions
            assert delta.norm() > 0
            assert (delta @ top).norm() < 1e-6 * delta.norm()
            # corpus keys: E‖ΔW k‖² = tr(ΔW C ΔWᵀ) <= ε ‖ΔW‖₂² tr(C), since C's null-space part holds <= ε
            change = torch.trace(delta @ cov @ delta.T)
            bound = 1e-2 * torch.linalg.matrix_norm(delta, 2) ** 2 * torch.trace(cov)
            assert change <= bound * (1 + 1e-6)
    assert_state(model, before)


def test_the_update_is_the_papers_equation() -> None:
    """``R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + L I)⁻¹``, computed the paper's way, equals the null-space solve."""
    torch.manual_seed(0)
    d_in, d_out = 12, 5
    keys = torch.randn(40, d_in, dtype=torch.float64) * torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    cov = keys.T @ keys / 40  # (I, I), spread eigenvalues
    space = NullSpace(cov, energy=0.2, l2=0.5)
    earlier = torch.randn(3, d_in)  # (n_p, I): keys of live edits
    space.add(space.basis.T @ earlier.double().T)
    new, resids = torch.randn(2, d_in), torch.randn(2, d_out)  # (n, I), (n, D)
    layer = nn.Linear(d_in, d_out, bias=False).double()
    before = layer.weight.detach().clone()
    null_space_update(layer, new, resids, space)

    p = space.basis @ space.basis.T  # (I, I)
    k1, kp, r = new.double().T, earlier.double().T, resids.double().T
    metric = kp @ kp.T @ p + k1 @ k1.T @ p + space.prior * torch.eye(d_in, dtype=torch.float64)
    paper = torch.linalg.solve(metric.T, (r @ k1.T @ p).T).T  # X metric = R K₁ᵀ P
    torch.testing.assert_close(layer.weight.detach() - before, paper, atol=1e-10, rtol=1e-8)
    assert 0 < space.basis.shape[1] < d_in


def test_null_basis_holds_at_most_its_share_of_the_energy() -> None:
    cov = torch.diag(torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64))  # trace 10
    assert null_basis(cov, 0.05).shape == (4, 0)
    (small,) = null_basis(cov, 0.1).T  # eigenvalue 1: the second axis
    assert torch.equal(small.abs(), torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert null_basis(cov, 0.35).shape == (4, 2)  # 1 + 2 <= 3.5


# --- sequential editing: the accumulation -------------------------------------------------


def test_a_second_edit_keeps_off_the_first_edits_keys(store: ImageStore) -> None:
    """With the first edit's keys accumulated, ΔW₂ k₁ ≈ 0, far smaller than without (a fresh editor).

    A small ``l2``: the accumulated keys weigh ‖ΔW P k₁‖² against the prior ``L``, so ``L`` sets how
    close to zero ΔW₂ k₁ gets.
    """
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    first, second = edit(model, 0), edit(model, 1)
    stacked = trained(model, {"l2": 0.1})
    sites = stacked.sites(model)
    with stacked.applied(model, first):
        k1 = [key_of(model, site, first) for site in sites]
        k2 = [key_of(model, site, second) for site in sites]
        w1 = weights(model, stacked)
        with stacked.applied(model, second) as edited:
            assert edited.score([first.edit, second.edit])[0].exact_match  # the first edit survives
            with_memory = [w - w0 for w, w0 in zip(weights(model, stacked), w1, strict=True)]
        fresh = AlphaEdit({**FAST, "l2": 0.1})  # the same statistics, but it never saw the first edit
        fresh._stats = stacked._stats
        with fresh.applied(model, second):
            without = [w - w0 for w, w0 in zip(weights(model, stacked), w1, strict=True)]
    for a, b, key1, key2 in zip(with_memory, without, k1, k2, strict=True):
        assert (a @ key1).norm() < 0.01 * (a @ key2).norm()
        assert (a @ key1).norm() < 0.05 * (b @ key1).norm()


def test_stacked_edits_restore_newest_first_to_weights_and_accumulation(store: ImageStore) -> None:
    model = tiny_model("llava", seed=0).bind_images(store)
    editor = trained(model)
    first_state = state(model)
    handles, states, kept = [], [], []
    for index in range(3):
        states.append(state(model))
        handles.append(editor.apply(model, edit(model, index)))
        spaces = [editor._spaces[(id(model), site)] for site in editor.sites(model)]
        assert [s.live for s in spaces] == [index + 1] * len(spaces)
        kept.append([s.kept.clone() for s in spaces if s.kept is not None])
    for index in reversed(range(3)):
        handles[index].restore()
        assert_state(model, states[index])
        if index:  # the accumulation is back to what it was before this edit
            now = [s.kept for s in spaces]
            assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(now, kept[index - 1], strict=True))
    assert all(s.kept is None and s.live == 0 for s in spaces)
    assert_state(model, first_state)


def test_a_repeated_first_edit_is_bit_identical_after_everything_is_restored(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    editor = trained(model)

    def first_edit() -> list[torch.Tensor]:
        torch.manual_seed(0)
        with editor.applied(model, edit(model, 0)):
            return weights(model, editor)

    reference = first_edit()
    with editor.applied(model, edit(model, 1)), editor.applied(model, edit(model, 2)):
        pass
    assert all(torch.equal(a, b) for a, b in zip(reference, first_edit(), strict=True))


# --- batches, failures, configs -----------------------------------------------------------


def test_alphaedit_writes_many_cases_in_one_update(store: ImageStore) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    editor = trained(model)
    cases = [edit(model, 0), edit(model, 1)]
    before, old = state(model), weights(model, editor)
    assert AlphaEdit.batches
    with editor.apply_many(model, cases) as edited:
        assert isinstance(edited, NullSpaceEdited)
        assert edited.details["cases"] == 2 and len(edited.details["null_dims"]) == 2
        assert all(s.exact_match for s in edited.score([c.edit for c in cases]))
        for w, w0 in zip(weights(model, editor), old, strict=True):
            sv = torch.linalg.svdvals(w - w0)  # two keys per layer: rank two
            assert sv[1] > 1e-6 * sv[0] and sv[2] < 1e-5 * sv[0]
        assert all(s.live == 2 for s in editor._spaces.values())
    assert_state(model, before)
    assert all(s.live == 0 and s.kept is None for s in editor._spaces.values())


def test_alphaedit_restores_and_accumulates_nothing_when_the_edit_collapses(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("causal_lm", seed=0).bind_images(store)
    editor = trained(model)
    before = state(model)

    def broken(module: nn.Module, keys: torch.Tensor, resids: torch.Tensor, space: NullSpace) -> torch.Tensor:
        module.weight.data.fill_(float("nan"))
        return space.basis.T @ keys.double().T

    monkeypatch.setattr(alphaedit_module, "null_space_update", broken)
    with pytest.raises(EditCollapsed):
        editor.apply(model, edit(model, 0))
    assert_state(model, before)
    assert all(s.live == 0 and s.kept is None for s in editor._spaces.values())


def test_alphaedit_reads_memit_statistics_from_the_shared_cache(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("causal_lm", seed=0)
    calls: list[int] = []
    real = _keyvalue.second_moment

    def counted(*args: object) -> list[torch.Tensor]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_keyvalue, "second_moment", counted)
    cases = [make_case(t, None, p) for t, p in TRAIN_FACTS]
    Memit().train(model, cases)
    AlphaEdit().train(model, cases)
    assert len(calls) == 1


def test_alphaedit_config_and_readiness_errors(store: ImageStore) -> None:
    with pytest.raises(ConfigError, match="alphaedit layers"):
        AlphaEdit({"layers": []})
    with pytest.raises(ConfigError, match="nullspace_energy"):
        AlphaEdit({"nullspace_energy": 0})
    with pytest.raises(ConfigError, match="nullspace_energy"):
        AlphaEdit({"nullspace_energy": 1.0})
    with pytest.raises(ConfigError, match="l2"):
        AlphaEdit({"l2": 0})
    with pytest.raises(ConfigError, match="cov_lambda"):
        AlphaEdit({"cov_lambda": 50.0})
    with pytest.raises(ConfigError, match="did you mean 'nullspace_energy'"):
        AlphaEdit({"nullspace_energ": 0.1})
    assert methods.get("alphaedit") is AlphaEdit
    assert AlphaEdit({"layers": [1, "2"]}).config.layers == (1, 2)
    with pytest.raises(EditorNotReadyError, match="train"):
        AlphaEdit().apply(tiny_model("causal_lm"), make_case(image=None))
    model = tiny_model("causal_lm", seed=0)
    full_rank = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"null space .* is empty"):
        AlphaEdit({"nullspace_energy": 1e-3})._space(model, "layer", full_rank)
