"""The bundled world model: tokenizer, deterministic training, saving and loading, shipped accuracy."""

from __future__ import annotations

import contextlib
import json
import platform
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mmke.bundled import (
    METHOD_PRESETS,
    TARGETS,
    BundledModel,
    WorldModelSpec,
    build_tokenizer,
    build_untrained,
    bundled_dir,
    evaluate_checks,
    keep_freed_memory,
    pretrain_vision,
    train,
    train_world_model,
    world_texts,
)
from mmke.bundled.training import (
    DRAWINGS,
    FreshViewImages,
    _frozen_tower,
    _kept_pixels,
    _round_arrays,
    _train_view_arrays,
    _vision_rounds,
    jitter_views,
)
from mmke.data.images import ImageStore
from mmke.data.schema import read_samples
from mmke.data.world import WorldConfig, build_world, visual_entities
from mmke.errors import ConfigError
from mmke.models import LVLM


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, config=WorldConfig.small())
    return out


@pytest.fixture(scope="module")
def smoke(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("model")
    return out, train_world_model(small_world, out, WorldModelSpec.smoke())


def test_tokenizer_is_word_level_and_covers_the_world(small_world: Path) -> None:
    tok = build_tokenizer(world_texts(small_world))
    enc = tok("USER: <image>\nwhich person is shown ? ASSISTANT: mira talvek", return_offsets_mapping=True)
    words = tok.convert_ids_to_tokens(enc.input_ids)
    assert words[:4] == ["<s>", "user", ":", "<image>"]
    assert words[-2:] == ["mira", "talvek"] or "<unk>" in words  # names are invented per seed
    sample = read_samples(small_world / "corpus_train.jsonl")[0]
    assert tok.unk_token_id not in tok(sample.prompt + " " + sample.target).input_ids


def test_smoke_training_saves_a_loadable_model(small_world: Path, smoke: tuple[Path, dict]) -> None:
    out, report = smoke
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json"):
        assert (out / name).is_file(), name
    assert "exact match" in (out / "README.md").read_text()
    assert set(report["checks"]) >= {"recognition_train_views", "facts_by_name", "multihop_2"}
    model = LVLM.load(out)
    assert model.family.name == "llava"
    again = evaluate_checks(model, small_world)
    assert again == report["checks"]  # the saved model is the trained one


def test_training_is_deterministic(small_world: Path, smoke: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = smoke
    train_world_model(small_world, tmp_path, WorldModelSpec.smoke())
    a = LVLM.load(first).model.state_dict()
    b = LVLM.load(tmp_path).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reusing_stage_one_gives_the_full_build(
    small_world: Path, smoke: tuple[Path, dict], tmp_path: Path
) -> None:
    first, _ = smoke
    report = train_world_model(small_world, tmp_path / "b", WorldModelSpec.smoke(), vision_from=first)
    assert report["vision_reused_from"] == str(first)
    a = LVLM.load(first).model.state_dict()
    b = LVLM.load(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = replace(WorldModelSpec.smoke(), vision_rounds=2)
    with pytest.raises(ConfigError, match="vision_rounds"):
        train_world_model(small_world, tmp_path / "c", other, vision_from=first)


def test_rounds_drawn_in_other_processes_train_the_same_tower(small_world: Path) -> None:
    """Stage 1 with its rounds drawn ahead in another process, or several at once in one process
    per core, gives the weights of drawing each round in-process."""
    # each draw serves two rounds: draws -1..2, "together" on 2 cores: -1+0, then 1+2
    spec = replace(WorldModelSpec.smoke(), vision_rounds=3, vision_views=2, vision_fresh=1, vision_jitter=1.0)
    tokenizer = build_tokenizer(world_texts(small_world))
    towers = []
    for drawing in DRAWINGS:
        torch.manual_seed(spec.seed)
        lvlm = build_untrained(spec, tokenizer)
        losses = pretrain_vision(lvlm, small_world, spec, drawing=drawing)
        tower = lvlm.layout.module(lvlm.layout.vision_tower())
        towers.append((losses, {k: v.clone() for k, v in tower.state_dict().items()}))
    (loss_a, a), *others = towers
    assert len(loss_a) > 3
    for loss_b, b in others:
        assert loss_a == loss_b
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown drawing"):
        pretrain_vision(build_untrained(spec, tokenizer), small_world, spec, drawing="elsewhere")


def test_each_drawn_view_serves_vision_views_over_vision_fresh_rounds(small_world: Path) -> None:
    """Round r trains on the views drawn for it, those drawn for the round before, and the
    training views; a draw count that does not divide the round's views is a clear error."""
    spec = replace(WorldModelSpec.smoke(), vision_rounds=3, vision_views=2, vision_fresh=1)
    lvlm = build_untrained(spec, build_tokenizer(world_texts(small_world)))
    head_of = {eid: i for i, eid in enumerate(visual_entities(small_world))}
    image_processor = lvlm.processor.image_processor
    draws = {d: _round_arrays(small_world, d, 1, head_of, image_processor) for d in range(-1, 3)}
    kept, kept_labels = _train_view_arrays(small_world, head_of, image_processor)
    rounds = list(_vision_rounds(lvlm, small_world, spec, head_of, "here"))
    assert len(rounds) == 3
    for r, (pixels, labels) in enumerate(rounds):
        (now, now_labels), (before, before_labels) = draws[r], draws[r - 1]
        assert torch.equal(pixels, torch.from_numpy(np.concatenate([now, before, kept])))
        assert labels.tolist() == now_labels + before_labels + kept_labels
    assert not np.array_equal(draws[0][0], draws[1][0])
    for fresh in (0, 3, 4):
        bad = replace(spec, vision_fresh=fresh, vision_views=4 if fresh == 3 else 2)
        with pytest.raises(ConfigError, match="vision_fresh"):
            next(_vision_rounds(lvlm, small_world, bad, head_of, "here"))


def test_jitter_views_moves_tints_and_specks_each_view_reproducibly() -> None:
    std = torch.tensor([0.25, 0.5, 1.0])
    square = torch.zeros(16, 3, 32, 32)
    square[:, :, 12:20, 12:20] = 1.0

    def jittered(strength: float, seed: int = 0) -> torch.Tensor:
        return jitter_views(square, strength, std, torch.Generator().manual_seed(seed))

    assert torch.allclose(jittered(0.0), square, atol=1e-6)
    assert torch.equal(jittered(1.0), jittered(1.0))
    assert not torch.equal(jittered(1.0), jittered(1.0, seed=1))
    out = jittered(1.0)
    # far corners stay background: shifted by the view's tint (at most 14 levels) and specks only
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (16, 3, 4)
    tint = corners.median(-1).values * std  # (16, 3), back in pixel units
    assert (tint.abs() <= 14 / 255 + 1e-6).all() and tint.std() > 0
    # the square moved: its centre of mass differs from view to view
    mass = (out - out.amin((-2, -1), keepdim=True))[:, 0].clamp(min=0)
    cols = (mass.sum(-2) * torch.arange(32)).sum(-1) / mass.sum((-2, -1))
    assert cols.std() > 0.3
    # on a blank view, what is left after the tint is grey specks on a few percent of pixels
    blank = jitter_views(torch.zeros(16, 3, 32, 32), 1.0, std, torch.Generator().manual_seed(0))
    levels = blank * std[:, None, None]
    specks = levels - levels.median(-1).values.median(-1).values[..., None, None]
    assert all(torch.allclose(specks[:, c], specks[:, 0], atol=1e-5) for c in (1, 2))
    hit = specks[:, 0].abs() > 1e-4
    assert 0 < hit.float().mean() < 0.06 and (specks.abs() <= 60 / 255 + 1e-5).all()


def test_stage_2_processes_each_picture_once_into_the_same_batches(small_world: Path) -> None:
    samples = [x for x in read_samples(small_world / "corpus_train.jsonl") if x.image is not None][:24]
    images = ImageStore(small_world)
    lvlm = build_untrained(WorldModelSpec.smoke(), build_tokenizer(world_texts(small_world)))
    lvlm.bind_images(images)
    distinct = {images.open(x.image).tobytes() for x in samples}
    plain = [lvlm.encode(samples[i : i + 8]) for i in (0, 8, 16, 0)]
    with _kept_pixels(lvlm):
        memo = lvlm.processor.image_processor
        kept = [lvlm.encode(samples[i : i + 8]) for i in (0, 8, 16, 0)]
        assert len(memo.kept) == len(distinct) > 8
    assert lvlm.processor.image_processor is memo.processor
    for a, b in zip(plain, kept, strict=True):
        assert a.inputs.keys() == b.inputs.keys()
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
        assert torch.equal(a.labels, b.labels)


def test_the_build_keeps_freed_memory_where_glibc_allows() -> None:
    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_stage_2_with_kept_tower_outputs_trains_the_same_weights(small_world: Path) -> None:
    """Each picture's frozen-tower output computed once trains what running the tower at every
    step trains. Bit for bit only where the BLAS kernels do not depend on the batch's size: so at
    the shipped width on our CPUs (the full build reproduces the shipped weights), not at the
    smoke width, where a picture's features move by about 1e-7 with its batch."""
    spec = replace(WorldModelSpec.smoke(), max_samples=96, epochs=2)
    tokenizer = build_tokenizer(world_texts(small_world))
    samples = read_samples(small_world / "corpus_train.jsonl")[:96]
    assert sum(x.image is not None for x in samples) > 10
    runs = []
    for keep in (False, True):
        torch.manual_seed(spec.seed)
        lvlm = build_untrained(spec, tokenizer).bind_images(ImageStore(small_world))
        lvlm.layout.module(lvlm.layout.vision_tower()).requires_grad_(False)
        with _frozen_tower(lvlm) if keep else contextlib.nullcontext():
            losses = train(lvlm, samples, spec)
        runs.append((losses, {k: v.clone() for k, v in lvlm.model.state_dict().items()}))
    assert type(lvlm.layout.module(lvlm.layout.vision_tower())).__name__ != "_KeptTowerOutputs"
    (loss_a, a), (loss_b, b) = runs
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and len(loss_a) >= 4
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_unbuilt_bundled_name_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mmke.errors import ModelLoadError

    monkeypatch.setattr(BundledModel, "path", lambda self: tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="mmke build model"):
        LVLM.load("world")


SHIPPED = (bundled_dir() / "config.json").is_file()


@pytest.fixture(scope="module")
def shipped_checks() -> dict:
    from mmke.data.world import world_dir

    return evaluate_checks(LVLM.load("world"), world_dir(0))


@pytest.mark.skipif(not SHIPPED, reason="bundled world model not built (mmke build model)")
def test_model_card_numbers_are_what_the_shipped_weights_measure(shipped_checks: dict) -> None:
    recorded = json.loads((bundled_dir() / "training.json").read_text())["checks"]
    assert shipped_checks.keys() == recorded.keys()
    for name, check in recorded.items():
        assert shipped_checks[name] == pytest.approx(check), name


@pytest.mark.skipif(not SHIPPED, reason="bundled world model not built (mmke build model)")
def test_the_shipped_weights_were_built_by_the_code_s_recipe() -> None:
    """``mmke build model`` rebuilds the shipped weights: the recorded recipe is the default one,
    and a field added since defaults to the behaviour the record predates (None: off)."""
    recorded = json.loads((bundled_dir() / "training.json").read_text())["spec"]
    code = asdict(WorldModelSpec())
    assert {k: code[k] for k in recorded} == recorded
    assert all(code[k] is None for k in code.keys() - recorded.keys())


@pytest.mark.skipif(not SHIPPED, reason="bundled world model not built (mmke build model)")
def test_shipped_model_meets_its_targets(shipped_checks: dict) -> None:
    for name, floor in TARGETS.items():
        assert shipped_checks[name]["exact_match"] >= floor, (name, shipped_checks[name])


@pytest.mark.skipif(not SHIPPED, reason="bundled world model not built (mmke build model)")
@pytest.mark.parametrize("method", ["serac", "mend", "ke"])
def test_the_main_job_finds_the_shipped_editors(method: str) -> None:
    """With the model's presets, each trainable method loads its shipped editor instead of training."""
    from mmke.config import RunConfig
    from mmke.eval.runner import method_options
    from mmke.registry import methods

    model = LVLM.load("world")
    editor = methods.get(method)(method_options(model.source, RunConfig(), method))
    assert editor.find_saved(model) == bundled_dir() / "editors" / method
    assert editor.networks(model) is not None


def test_fresh_views_replace_only_training_views_at_the_given_share(small_world: Path) -> None:
    from mmke.data.images import ImageStore
    from mmke.data.world import entity_image, visual_entities

    views = json.loads((small_world / "world.json").read_text())["views"]
    eid = visual_entities(small_world)[0]
    assert views["train"][0] == FreshViewImages.CANONICAL
    train_ref, held_ref = entity_image(eid, views["train"][1]), entity_image(eid, views["held_out"][0])
    original = ImageStore(small_world).open(train_ref).tobytes()
    never, always = (FreshViewImages(small_world, 3, seed=0, share=s) for s in (0.0, 1.0))
    assert all(never.open(train_ref).tobytes() == original for _ in range(5))
    assert all(always.open(train_ref).tobytes() != original for _ in range(5))
    held = ImageStore(small_world).open(held_ref).tobytes()
    assert always.open(held_ref).tobytes() == held  # the checks' views are never touched
    canonical = entity_image(eid, FreshViewImages.CANONICAL)  # the cases' picture, kept as drawn
    assert always.open(canonical).tobytes() == ImageStore(small_world).open(canonical).tobytes()


def test_the_shipped_method_presets_are_the_code_s() -> None:
    # a run reads the file next to the weights; editors are cached by their settings, so a file
    # left behind by a preset change silently evaluates an older editor
    import yaml

    shipped = yaml.safe_load((bundled_dir() / "mmke_methods.yaml").read_text())
    assert shipped == METHOD_PRESETS
