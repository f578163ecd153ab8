"""Issue 25's contract pieces: task types through the summary and report, companion edits in every
protocol, ComprehendEdit's neighbour groups, MMQAKE's chain metrics, and MMKU's measures on records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from _runs import small_run
from mmke.data.schema import read_cases, write_cases
from mmke.eval.metrics import case_values, probe_result
from mmke.eval.protocols import protocol_named
from mmke.eval.records import CaseRecord
from mmke.methods import IKE
from mmke.models.scoring import ItemScore
from mmke.report import write_report
from mmke.report.tables import build_tables, select_groups
from mmke.types import LOCALITY_KINDS, EditCase, EditFact, EditType, Probe, ProbeKind

K = ProbeKind


def _score(right: bool) -> ItemScore:
    t = torch.tensor([3, 4])
    a = t if right else torch.tensor([3, 9])
    return ItemScore(t, a, torch.stack([a, a + 1], dim=1), 1.0 if right else 0.5, right, 0.2)


def _result(kind: ProbeKind, right: bool, **where: object):
    probe = Probe(kind, "q", "paris", **where)  # type: ignore[arg-type]
    return probe_result(probe, _score(right), _score(True), generated="paris" if right else "rome")


def test_m_acc_takes_any_paraphrase_and_h_acc_needs_that_paraphrases_steps() -> None:
    chain = {"hop": 2, "group": "chain2"}
    results = [
        # paraphrase 0: final answer right, its second step wrong
        _result(K.PORTABILITY, True, variant=0, **chain),
        _result(K.HOP_STEP, True, variant=0, **chain),
        _result(K.HOP_STEP, False, variant=0, **chain),
        # paraphrase 1: final answer wrong, every step right
        _result(K.PORTABILITY, False, variant=1, **chain),
        _result(K.HOP_STEP, True, variant=1, **chain),
        _result(K.HOP_STEP, True, variant=1, **chain),
        # a 1-hop chain answered right with its one step right
        _result(K.PORTABILITY, True, variant=0, hop=1, group="chain1"),
        _result(K.HOP_STEP, True, variant=0, hop=1, group="chain1"),
    ]
    em = case_values(results, "exact_match")
    assert em["m_acc"] == 1.0 and em["m_acc_hop2"] == 1.0
    assert em["h_acc"] == 0.5 and em["h_acc_hop2"] == 0.0 and em["h_acc_hop1"] == 1.0
    assert case_values(results, "generated_match")["h_acc"] == 0.5
    # VLKEB's portability probes have no chain: no M-Acc for them
    assert "m_acc" not in case_values([_result(K.PORTABILITY, True, hop=1)])


def test_kgi_and_kpi_break_down_by_neighbour_list() -> None:
    results = [
        _result(K.IN_DOMAIN_GENERALITY, True, group="img_topk"),
        _result(K.IN_DOMAIN_GENERALITY, False, group="img_topk"),
        _result(K.IN_DOMAIN_GENERALITY, False, group="txt_last_topk"),
        _result(K.IN_DOMAIN_LOCALITY, True, group="img_topk"),
    ]
    em = case_values(results, "exact_match")
    assert em["kgi_img_topk"] == 0.5 and em["kgi_txt_last_topk"] == 0.0
    assert em["in_domain_generality"] == 1 / 3 and em["kpi_img_topk"] == 1.0
    assert "kgi_txt_topk" not in em


def test_generation_is_also_scored_by_vqa_accuracy_and_f1() -> None:
    probe = Probe(K.RELIABILITY, "q", "eiffel tower", aliases=("la tour",))
    r = probe_result(probe, _score(True), generated="I think it is the Eiffel Tower, in Paris.")
    assert (r.generated_match, r.generated_vqa) == (0.0, 1.0)  # the first answer is "i think …"
    assert 0 < r.generated_f1 < 1  # type: ignore[operator]
    loc = probe_result(Probe(K.TEXT_LOCALITY, "q", "x"), _score(True), _score(True), generated="x")
    assert loc.generated_vqa is None and loc.generated_f1 is None


def test_companion_facts_are_written_after_the_case_in_every_protocol() -> None:
    second = EditFact("which colour is the flag of zisasia ?", "green")
    onehop = EditFact("where is bralvaman ?", "zisasia")
    case = EditCase(
        "c1",
        EditType.VISUAL_ENTITY,
        EditFact("who is this ?", "bralvaman"),
        (Probe(K.PORTABILITY, "where is the person from ?", "zisasia", hop=2, onehop_edit=onehop),),
        companions=(second,),
    )
    for name in ("single", "sequential", "lifelong", "batch"):
        writes = protocol_named(name).writes(case)
        assert [w.edit for w in writes] == [case.edit, second]
        assert writes[1].case_id == "c1/companion1" and writes[1].probes == ()
    assert [w.edit for w in protocol_named("edit_onehop").writes(case)] == [case.edit, second, onehop]


def test_medical_slice_reports_understanding_and_reasoning_single_and_lifelong(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    medical = ("edit_types=[medical_mcq]", "limit=null", "methods=[ft_llm,grace]")
    single_store, single = small_run(setup, tmp_path / "single", *medical)
    records = [CaseRecord.from_json(x) for x in (single_store.path / "cases.jsonl").read_text().splitlines()]
    assert {r.task for r in records} == {"understanding", "reasoning"}
    tasks = select_groups(single, "single", "all", tasks=True)
    assert {(g.method, g.task) for g in tasks} == {
        (m, t) for m in ("ft_llm", "grace") for t in ("understanding", "reasoning")
    }
    assert sum(g.n_cases for g in tasks if g.method == "grace") == len(records) // 2
    # the per-task groups are not mistaken for more "all" rows
    assert len(select_groups(single, "single", "all")) == 2

    lifelong_store, lifelong = small_run(
        setup, tmp_path / "lifelong", *medical, "protocol=lifelong", "checkpoints=[4]"
    )
    for summary, store in ((single, single_store), (lifelong, lifelong_store)):
        table = next(t for t in build_tables(summary) if t.name == "tasks")
        assert {row[2] for row in table.rows} == {"understanding", "reasoning"}
        assert any(t.name == "efficiency" for t in build_tables(summary))
        text = write_report(store.path).read_text()
        assert "understanding vs reasoning" in text and "Efficiency per edit" in text
    rows = next(t for t in build_tables(lifelong) if t.name == "tasks").rows
    # a stream that collapses early (FT on the untrained model may) is shown where it ended
    grace = {(row[1], row[2]) for row in rows if row[3] == "grace"}
    assert grace == {(f"lifelong ({len(records) // 2} edits)", t) for t in ("understanding", "reasoning")}
    saved = json.loads((lifelong_store.path / "summary.json").read_text())
    assert any(g.get("task") == "understanding" and g["checkpoint"] == 4 for g in saved["groups"])


def test_a_case_and_its_text_only_companion_run_on_every_kind_of_method(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt method gets the edit and its companion in one context (its handle holds only what is
    written through it); a vision-side FT cannot reach a text-only fact and writes nothing for it."""
    world, _ = setup
    companion = EditFact("what is four plus nine ?", "ten")
    cases = [replace(c, companions=(companion,)) for c in read_cases(world / "cases_eval.jsonl", world)[:3]]
    write_cases(tmp_path / "cases.jsonl", cases)
    written: list[list[EditFact]] = []
    many = IKE.apply_many

    def spy(self: IKE, model, group):  # type: ignore[no-untyped-def]
        written.append([c.edit for c in group])
        return many(self, model, group)

    monkeypatch.setattr(IKE, "apply_many", spy)
    store, summary = small_run(
        setup,
        tmp_path / "runs",
        f"benchmark=native:{tmp_path / 'cases.jsonl'}",
        f"benchmark_options.train={world / 'cases_train.jsonl'}",
        "methods=[ike,ft_projector]",
    )
    assert written == [[c.edit, companion] for c in cases]
    records = [CaseRecord.from_json(x) for x in (store.path / "cases.jsonl").read_text().splitlines()]
    assert (
        sorted((r.run.method, r.status) for r in records)
        == [("ft_projector", "ok")] * 3 + [("ike", "ok")] * 3
    )
    assert not summary.run.not_run


def test_a_method_that_cannot_run_is_reported_not_run_not_failed_case_by_case(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    world, _ = setup
    train = [
        replace(c, probes=tuple(p for p in c.probes if p.kind not in LOCALITY_KINDS))
        for c in read_cases(world / "cases_train.jsonl", world)
    ]
    write_cases(tmp_path / "train.jsonl", train)
    store, summary = small_run(
        setup,
        tmp_path / "runs",
        f"benchmark_options.train={tmp_path / 'train.jsonl'}",
        "methods=[wise,grace]",
    )
    assert "no usable locality probes" in summary.run.not_run["wise"]
    records = [CaseRecord.from_json(x) for x in (store.path / "cases.jsonl").read_text().splitlines()]
    assert {r.run.method for r in records} == {"grace"} and all(r.ok for r in records)
