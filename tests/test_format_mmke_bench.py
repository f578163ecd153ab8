"""The MMKE-Bench reader (entity / visual / user files) and the paper's six-column table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmke.data.benchmark import Benchmark, load_benchmark
from mmke.errors import BadRecordError, ConfigError
from mmke.eval.records import GroupSummary, RunInfo, RunSummary
from mmke.report.tables import mmke_bench_table, render_markdown, select_table
from mmke.types import EditCase, EditType, ImageRef, ProbeKind

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
IMAGES = FIXTURES / "images"
K = ProbeKind


def _load(file: Path | str, skip_bad: bool = False, **options: Any) -> Benchmark:
    return load_benchmark(f"mmke_bench:{file}", image_root=IMAGES, skip_bad=skip_bad, options=options)


def _fixture(name: str) -> Benchmark:
    return _load(FIXTURES / "mmke_bench" / f"{name}_eval.json")


def _kinds(case: EditCase) -> list[str]:
    return [p.kind.value for p in case.probes]


def _img(path: str) -> ImageRef:
    return ImageRef(path)


# ---------------------------------------------------------------- the three files


def test_entity_records_have_numbered_rel_probes_and_both_answer_spellings() -> None:
    bench = _fixture("entity")
    assert bench.name == "mmke_bench:entity_eval" and bench.skipped == ()
    first, second = bench.cases
    assert {c.edit_type for c in bench.cases} == {EditType.VISUAL_ENTITY}
    assert first.meta == {"knowledge_type": "entity_level", "source": "entity_eval.json:2"}
    assert second.meta["knowledge_type"] == "entity_level"  # written as the integer code 0
    text_rel = first.probes_of(K.TEXT_RELIABILITY)
    assert [(p.target, p.image) for p in text_rel] == [("the cello", None), ("Lisbon", None)]
    assert [p.target for p in second.probes_of(K.TEXT_RELIABILITY)] == ["212 metres", "Ines Marlow"]
    image_rel = first.probes_of(K.IMAGE_RELIABILITY)
    assert [p.image for p in image_rel] == [_img("entity/e_001.jpg")] * 2
    assert [p.target for p in image_rel] == ["the cello", "Lisbon"]


def test_entity_image_generality_is_the_papers_gen_m_rel() -> None:
    first, second = _fixture("entity").cases
    gen = first.probes_of(K.IMAGE_GENERALITY)
    assert [p.prompt for p in gen] == [p.prompt for p in first.probes_of(K.IMAGE_RELIABILITY)]
    assert {p.image for p in gen} == {_img("entity/e_002.jpg")}
    assert [p.prompt for p in second.probes_of(K.IMAGE_GENERALITY)] == [
        "What is the name of this building?",
        "Who designed the building in the image?",
    ]
    assert len(set(second.probes)) == len(second.probes)


def test_entity_base_probes_and_portability_on_the_edit_image() -> None:
    first, second = _fixture("entity").cases
    assert _kinds(first)[:4] == ["reliability", "text_generality", "text_locality", "image_locality"]
    assert first.edit.target == "Mira Castellan" and first.edit.ground_truth == "Ada Lovelace"
    assert first.probes_of(K.IMAGE_LOCALITY)[0].image == _img("val2014/COCO_val2014_000000000001.jpg")
    assert second.probes_of(K.TEXT_LOCALITY)[0].target == "1989"  # a number in the file
    port = first.probes_of(K.PORTABILITY)
    assert [(p.hop, p.target, p.image) for p in port] == [
        (1, "Portugal", _img("entity/e_001.jpg")),
        (2, "Lisbon", _img("entity/e_001.jpg")),
    ]
    assert [p.hop for p in second.probes_of(K.PORTABILITY)] == [3]


def test_visual_records_use_rel_m_rel_and_the_image_rephrase_question() -> None:
    first, second = _fixture("visual").cases
    assert {c.edit_type for c in (first, second)} == {EditType.VISUAL_SEMANTIC}
    assert second.meta["knowledge_type"] == "visual_knowledge"  # no field: from the file name
    assert [(p.prompt, p.target, p.image) for p in first.probes_of(K.TEXT_RELIABILITY)] == [
        ("What does the open-palm salute mean?", "gratitude", None)
    ]
    (m_rel,) = first.probes_of(K.IMAGE_RELIABILITY)
    assert (m_rel.target, m_rel.image) == ("gratitude", _img("visual/img_001.jpg"))
    gen = first.probes_of(K.IMAGE_GENERALITY)
    assert [(p.prompt, p.target) for p in gen] == [
        ("What does the person's hand sign mean?", "gratitude"),  # Gen_M_Rel answers with m_rel_ans
    ]
    assert {p.image for p in gen} == {_img("visual/img_002.jpg")}


def test_visual_and_user_portability_use_one_hop_img_else_the_edit_image() -> None:
    visual, visual_no_hop_img = _fixture("visual").cases
    assert visual.probes_of(K.PORTABILITY)[0].image == _img("visual/img_003.jpg")
    assert visual_no_hop_img.probes_of(K.PORTABILITY)[0].image == visual_no_hop_img.edit.image
    user = _fixture("user").cases[0]
    (port,) = user.probes_of(K.PORTABILITY)
    assert (port.hop, port.target, port.image) == (1, "a red ball", _img("user/u_003.jpg"))


def test_user_records() -> None:
    first, second = _fixture("user").cases
    assert {c.edit_type for c in (first, second)} == {EditType.USER_SPECIFIC}
    assert second.meta["knowledge_type"] == "user_specific"  # the integer code 1
    assert [p.target for p in first.probes_of(K.TEXT_RELIABILITY)] == ["a beagle", "four years"]
    assert [p.target for p in first.probes_of(K.IMAGE_RELIABILITY)] == ["a beagle", "four years"]
    assert len(first.probes_of(K.IMAGE_GENERALITY)) == 2
    assert second.probes_of(K.PORTABILITY) == ()  # no port_new
    assert [p.image for p in second.probes_of(K.IMAGE_GENERALITY)] == [_img("user/u_003.jpg")] * 2


def test_train_option_and_unknown_option() -> None:
    folder = FIXTURES / "mmke_bench"
    bench = _load(folder / "entity_eval.json", train=str(folder / "user_eval.json"))
    assert [c.edit_type for c in bench.train_cases] == [EditType.USER_SPECIFIC] * 2
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        _load(folder / "entity_eval.json", trian="x")


# ---------------------------------------------------------------- bad records


def _records(name: str) -> list[dict[str, Any]]:
    return json.loads((FIXTURES / "mmke_bench" / f"{name}_eval.json").read_text())


def _write(tmp_path: Path, name: str, records: list[dict[str, Any]]) -> Path:
    """One record per line, so record i starts on line i + 2."""
    path = tmp_path / name
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def _without_rel_answer(rec: dict[str, Any]) -> None:
    del rec["rel_1_ans"]


def _unknown_type(rec: dict[str, Any]) -> None:
    rec["knowledge_type"] = "entity"


def _escaping_image(rec: dict[str, Any]) -> None:
    rec["image"] = "../mmke_bench/entity_eval.json"


def _bad_hop(rec: dict[str, Any]) -> None:
    rec["port_new"][0]["port_type"] = "5-hop"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_without_rel_answer, "field 'rel_ans_1' or 'rel_1_ans' missing"),
        (_unknown_type, "field 'knowledge_type' is 'entity'; accepted: entity_level, visual_knowledge"),
        (_escaping_image, "field 'image': image path '../mmke_bench/entity_eval.json' escapes the data root"),
        (_bad_hop, "port_new[0]: "),  # the wording is vlkeb.port_new_probes's once that is shared
    ],
)
def test_a_bad_record_is_refused_or_skipped(tmp_path: Path, spoil: Any, message: str) -> None:
    records = _records("entity")
    spoil(records[1])
    path = _write(tmp_path, "entity_eval.json", records)
    with pytest.raises(BadRecordError) as err:
        _load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:3 (entity_eval-00001): {message}")
    assert spoil is not _bad_hop or "'5-hop'" in text
    bench = _load(path, skip_bad=True)
    assert [c.meta["source"] for c in bench.cases] == ["entity_eval.json:2"]
    (problem,) = bench.skipped
    assert (problem.line, problem.case_id) == (3, "entity_eval-00001")


def test_knowledge_type_needs_the_field_or_a_telling_file_name(tmp_path: Path) -> None:
    records = _records("entity")
    del records[0]["knowledge_type"]
    with pytest.raises(BadRecordError, match=r"eval\.json:2 \(eval-00000\): field 'knowledge_type' missing"):
        _load(_write(tmp_path, "eval.json", records))
    folder = tmp_path / "entity"
    folder.mkdir()  # MMKE-Bench's README layout: data_json/entity/eval.json
    assert _load(_write(folder, "eval.json", records)).cases[0].edit_type == EditType.VISUAL_ENTITY


def test_true_is_not_a_knowledge_type_code(tmp_path: Path) -> None:
    records = _records("user")
    records[0]["knowledge_type"] = True
    with pytest.raises(BadRecordError, match="'knowledge_type' is True"):
        _load(_write(tmp_path, "user_eval.json", records))


# ---------------------------------------------------------------- the paper's table


def _group(method: str, edit_type: str, metrics: dict[str, float]) -> GroupSummary:
    return GroupSummary("blip2", method, "single", None, None, edit_type, 2, 0, 0, metrics=metrics)


def _summary() -> RunSummary:
    full = {
        "reliability": 0.99,
        "text_locality": 0.91,
        "image_locality": 0.82,
        "text_reliability": 0.73,
        "image_reliability": 0.64,
        "image_generality": 0.55,
        "portability": 0.46,
    }
    groups = []
    for i, method in enumerate(("ft_llm", "ike")):
        scaled = {k: v - 0.1 * i for k, v in full.items()}
        groups.append(_group(method, "all", scaled))
        for edit_type in ("user_specific", "visual_entity", "visual_semantic"):
            metrics = dict(scaled)
            if (method, edit_type) == ("ike", "visual_semantic"):
                del metrics["portability"]  # ike on visual semantic without portability
            groups.append(_group(method, edit_type, metrics))
    return RunSummary(RunInfo(), tuple(groups))


def test_mmke_bench_table_has_the_six_paper_columns_per_edit_type() -> None:
    table = mmke_bench_table(_summary())
    assert table is not None and table.name == "mmke_bench"
    assert table.columns == (
        "Model",
        "Edit type",
        "Method",
        "T-Loc",
        "I-Loc",
        "T-Rel",
        "I-Rel",
        "I-Gen",
        "Port",
    )
    assert [r[1:3] for r in table.rows] == [
        ("Visual Entity", "ft_llm"),
        ("Visual Entity", "ike"),
        ("Visual Semantic", "ft_llm"),
        ("Visual Semantic", "ike"),
        ("User-Specific", "ft_llm"),
        ("User-Specific", "ike"),
    ]
    assert table.rows[0][3:] == pytest.approx((91.0, 82.0, 73.0, 64.0, 55.0, 46.0))
    assert table.rows[3][-1] is None
    lines = render_markdown(table).splitlines()
    bold = " | ".join(f"**{v}**" for v in ("91.0", "82.0", "73.0", "64.0", "55.0", "46.0"))
    assert lines[4] == f"| blip2 | Visual Entity | ft\\_llm | {bold} |"
    assert lines[5] == "|  |  | ike | 81.0 | 72.0 | 63.0 | 54.0 | 45.0 | 36.0 |"
    assert lines[7] == "|  |  | ike | 81.0 | 72.0 | 63.0 | 54.0 | 45.0 | – |"  # Visual Semantic: no Port


def test_mmke_bench_table_is_in_the_report_and_selectable_by_name() -> None:
    assert select_table(_summary(), "mmke_bench").columns[3:] == (
        "T-Loc",
        "I-Loc",
        "T-Rel",
        "I-Rel",
        "I-Gen",
        "Port",
    )
    with pytest.raises(ConfigError, match="did you mean 'mmke_bench'"):
        select_table(_summary(), "mmke-bench")
    no_types = RunSummary(
        RunInfo(), tuple(g for g in _summary().groups if g.edit_type == "all" and g.task is None)
    )
    assert mmke_bench_table(no_types) is None
