"""``mmke edit``: a weight edit saves a transformers folder that holds the edit and nothing else; a
memory edit (GRACE) saves a state that only mmke reloads; outputs and facts that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from mmke.api import fact_case
from mmke.cli import _Parser
from mmke.data.images import ImageStore
from mmke.data.schema import fact_to_json
from mmke.errors import BadRecordError, ConfigError, ModelLoadError, UnknownNameError
from mmke.methods import FineTune
from mmke.models import LVLM
from mmke.models.base import ModalityError
from mmke.models.tiny import save_tiny, tiny_model
from mmke.saving import (
    EDITS_FILE,
    STATE_FILE,
    EditedModel,
    add_edit_parser,
    edit_and_save,
    load_edited,
    read_facts,
)
from mmke.types import EditCase, EditFact, ImageRef

#: settings that move a tiny random model (tests/test_batch.py SETTINGS)
FT = {"lr": 1e-2, "steps": 20}
FACTS = (
    EditFact("what is the capital of france?", "rome", ImageRef("red.png"), ground_truth="paris"),
    EditFact("london is a city in", "paris"),
)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA saved as a transformers folder."""
    return save_tiny(tiny_model("llava", seed=0), tmp_path_factory.mktemp("base"))


def cases() -> tuple[EditCase, ...]:
    return tuple(fact_case(f, case_id=f"fact-{i}") for i, f in enumerate(FACTS))


def load(path: Path, images: Path) -> LVLM:
    return LVLM.load(path, dtype="float32", images=ImageStore(images))


def test_a_weight_edit_saves_a_transformers_folder_that_holds_the_edit_and_only_it(
    base: Path, images: Path, tmp_path: Path
) -> None:
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "edited"
    saved = edit_and_save(base, "ft_llm", cases(), out, options=FT, image_root=images)
    assert saved.kind == "weights" and not (out / STATE_FILE).exists()

    plain = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)  # no mmke needed
    before = LlavaForConditionalGeneration.from_pretrained(base, local_files_only=True).state_dict()
    after = plain.state_dict()
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    site = set(FineTune({"site": "llm"}).site_params(load(base, images)))
    assert moved and moved <= site and moved == set(saved.changed)

    edited, unedited = load(out, images), load(base, images)
    assert all(s.exact_match for s in edited.score(FACTS))  # the edited answers, teacher-forced
    assert not any(s.exact_match for s in unedited.score(FACTS))  # the base folder never had them
    assert edited.generate(FACTS[1:], max_new_tokens=1)[0].strip() == "paris"

    card = (out / "README.md").read_text(encoding="utf-8")
    for text in (
        "ft_llm",
        "what is the capital of france?",
        "rome",
        "paris",
        "images/red.png",
        "| lr | 0.01 |",
    ):
        assert text in card
    assert [c.edit for c in read_facts(out / EDITS_FILE)[0]] == list(FACTS)  # mmke lists the edits
    assert (out / "images" / "red.png").is_file()


def test_lora_adapters_are_merged_into_a_weight_edit(base: Path, images: Path, tmp_path: Path) -> None:
    saved = edit_and_save(
        base, "lora", cases(), tmp_path / "lora", options={"lr": 5e-2, "steps": 20}, image_root=images
    )
    assert saved.kind == "weights" and saved.changed
    assert all(s.exact_match for s in load(tmp_path / "lora", images).score(FACTS))


def test_a_memory_edit_saves_a_state_that_only_mmke_reloads(base: Path, images: Path, tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "grace"
    saved = edit_and_save(base, "grace", cases(), out, image_root=images)
    assert saved.kind == "memory" and any("GraceAdaptor" in line for line in saved.changed)
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    with pytest.raises(OSError):  # nothing there pretends to be the edited model
        LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)

    edited = load_edited(out)
    assert isinstance(edited, EditedModel)
    assert all(s.exact_match for s in edited.score(FACTS))
    assert edited.generate(FACTS[1:], max_new_tokens=1)[0].strip() == "paris"
    assert not any(s.exact_match for s in load(base, images).score(FACTS))  # the base is unchanged
    assert "this folder is NOT a model" in (out / "README.md").read_text(encoding="utf-8")


def test_a_replay_that_answers_differently_from_the_saved_edit_is_refused(
    base: Path, images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "grace"
    edit_and_save(base, "grace", cases(), out, image_root=images)
    state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    state["checks"][0]["after"] = 0.5  # as if the edit had answered differently when saved
    (out / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"fact-0: 50% .* when saved, 100% now"):
        load_edited(out)


def test_outputs_methods_and_facts_that_are_refused(base: Path, images: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not empty"):
        edit_and_save(base, "ft_llm", cases(), taken, image_root=images)
    with pytest.raises(ConfigError, match="not written by mmke edit"):  # --overwrite deletes only our folders
        edit_and_save(base, "ft_llm", cases(), taken, image_root=images, overwrite=True)
    assert (taken / "notes.txt").read_text(encoding="utf-8") == "mine"
    with pytest.raises(UnknownNameError, match="did you mean 'grace'"):
        edit_and_save(base, "gracee", cases(), tmp_path / "new", image_root=images)
    text_only = save_tiny(tiny_model("causal_lm"), tmp_path / "text-model")
    with pytest.raises(ModalityError, match=r"fact-0: has image 'red\.png' but causal_lm is text-only"):
        edit_and_save(text_only, "ft_llm", cases(), tmp_path / "new", image_root=images)
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_an_earlier_edit(base: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "edited"
    edit_and_save(base, "grace", cases(), out, image_root=images)
    saved = edit_and_save(base, "ft_llm", cases()[1:], out, options=FT, image_root=images, overwrite=True)
    assert saved.kind == "weights" and not (out / STATE_FILE).exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]  # no temporary folder left beside it


def test_a_facts_file_is_read_strictly(tmp_path: Path, images: Path) -> None:
    good = tmp_path / "facts.jsonl"
    good.write_text(
        "".join(json.dumps(f) + "\n" for f in map(fact_to_json, FACTS)),
        encoding="utf-8",
    )
    facts, root = read_facts(good, images)
    assert [c.edit for c in facts] == list(FACTS) and root == images
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "target": "t"}\n{"prompt": "p", "targte": "t"}\n', encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"bad.jsonl:2: unknown key 'targte'"):
        read_facts(bad)


def test_the_edit_command_saves_one_fact(base: Path, images: Path, tmp_path: Path) -> None:
    parser = _Parser()  # mmke's own: key=value settings after options
    add_edit_parser(parser.add_subparsers())
    out = tmp_path / "cli"
    argv = ["edit", str(base), "--method", "ft_llm", "--prompt", "what is the capital of france?"]
    argv += ["--image", str(images / "red.png"), "--target", "rome", "--out", str(out), "lr=0.01", "steps=20"]
    args = parser.parse_args(argv)
    console = Console(record=True, width=200)
    assert args.func(args, console) == 0
    assert "1 answered exactly after editing; a transformers folder" in console.export_text()
    assert load(out, images).score(FACTS[:1])[0].exact_match


def test_mmke_edit_command(tmp_path: Path) -> None:
    from mmke.cli import main

    base = save_tiny(tiny_model("llava"), tmp_path / "base")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(tmp_path / "red.png")
    argv = ["edit", str(base), "--method", "ft_llm", "--prompt", "what is the capital of france?"]
    argv += ["--image", str(tmp_path / "red.png"), "--target", "rome", "--out", str(tmp_path / "out")]
    assert main([*argv, "lr=0.01", "steps=20"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = [
        "edit",
        str(base),
        "--method",
        "gracee",
        "--prompt",
        "p",
        "--target",
        "t",
        "--out",
        str(tmp_path / "o2"),
    ]
    assert main(bad) == 2
