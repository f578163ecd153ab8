"""Metrics: per-probe scores, locality agreement (mmke and VLKEB variants), case means, golden summary."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from mmke.errors import UnknownNameError
from mmke.eval import CaseRecord, ProbeResult, metric_specs, probe_result, score_case, summarize
from mmke.eval.metrics import CaseScores, case_values
from mmke.models.scoring import ItemScore, agreement, scorer_named, topk_rankwise
from mmke.registry import metrics as metric_registry
from mmke.types import AttackType, Probe, ProbeKind


def score(target: list[int], argmax: list[int], topk: list[list[int]] | None = None) -> ItemScore:
    """An ItemScore built by hand; top-k defaults to the argmax then fixed filler ids."""
    t, a = torch.tensor(target), torch.tensor(argmax)
    top = torch.tensor(topk) if topk is not None else torch.stack([a, a + 100, a + 200], dim=1)  # (n, 3)
    acc = float((t == a).float().mean())
    return ItemScore(t, a, top, acc, acc == 1.0, 1.5)


def probe(kind: ProbeKind, hop: int | None = None, attack: AttackType | None = None) -> Probe:
    return Probe(kind=kind, prompt="q", target="a", hop=hop, attack=attack)


# ---------------------------------------------------------------- per probe


def test_agreement_counts_positions_whose_top1_is_unchanged() -> None:
    assert agreement(torch.tensor([7, 8, 9, 10]), torch.tensor([7, 8, 9, 0])) == 0.75
    with pytest.raises(ValueError, match="differ"):
        agreement(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="empty"):
        agreement(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_topk_rankwise_is_rank_order_not_set_overlap() -> None:
    pre = torch.tensor([[1, 2, 3], [4, 5, 6]])
    post = torch.tensor([[1, 3, 2], [4, 5, 6]])  # same set at position 0, ranks 2 and 3 swapped
    assert topk_rankwise(pre, post) == pytest.approx(4 / 6)


def test_probe_result_scores_target_kinds_from_the_post_score() -> None:
    r = probe_result(probe(ProbeKind.RELIABILITY), score([1, 2, 3, 4], [1, 2, 0, 0]))
    assert r == ProbeResult("reliability", None, None, 0.5, 0.0, 1.5, None, None, None, n_tokens=4)


def test_probe_result_locality_is_agreement_with_pre() -> None:
    pre, post = score([5, 5, 5, 5], [7, 8, 9, 10]), score([5, 5, 5, 5], [7, 8, 9, 0])
    r = probe_result(probe(ProbeKind.TEXT_LOCALITY), post, pre)
    assert (r.token_accuracy, r.exact_match, r.agreement, r.n_tokens) == (0.75, 0.0, 0.75, 4)
    same = probe_result(probe(ProbeKind.IMAGE_LOCALITY), pre, pre)
    assert (same.token_accuracy, same.exact_match) == (1.0, 1.0)
    with pytest.raises(ValueError, match="pre-edit"):
        probe_result(probe(ProbeKind.TEXT_LOCALITY), post)


def test_vlkeb_scoring_uses_top1_for_text_and_top10_rankwise_for_image() -> None:
    # vlkeb locality reads the all-position top-k (context_topk); here it is just the answer span
    pre = score([0, 0], [1, 4], topk=[[1, 2, 3], [4, 5, 6]])
    post = score([0, 0], [1, 4], topk=[[1, 3, 2], [4, 5, 6]])
    pre, post = replace(pre, context_topk=pre.topk_ids), replace(post, context_topk=post.topk_ids)
    vlkeb = scorer_named("vlkeb")
    text = probe_result(probe(ProbeKind.TEXT_LOCALITY), post, pre, vlkeb)
    image = probe_result(probe(ProbeKind.IMAGE_LOCALITY), post, pre, vlkeb)
    mmke = probe_result(probe(ProbeKind.IMAGE_LOCALITY), post, pre, scorer_named("mmke"))
    assert text.token_accuracy == 1.0
    assert image.token_accuracy == pytest.approx(4 / 6) and image.exact_match == 0.0
    assert mmke.token_accuracy == 1.0
    with pytest.raises(UnknownNameError, match="unknown scorer 'easyedi'"):
        scorer_named("easyedi")


def test_hop_and_attack_metrics_break_their_headline_down() -> None:
    results = [
        probe_result(probe(ProbeKind.PORTABILITY, hop=2), score([1], [1])),
        probe_result(probe(ProbeKind.ROBUSTNESS, attack=AttackType.PSEUDO_AUTHORITY), score([1], [0])),
        probe_result(probe(ProbeKind.IMAGE_GENERALITY), score([1], [1])),
    ]
    assert case_values(results) == {
        "image_generality": 1.0,
        "portability": 1.0,
        "portability_hop2": 1.0,
        "robustness": 0.0,
        "robustness_pseudo_authority": 0.0,
    }


def test_every_contract_key_is_described_and_registered() -> None:
    keys = {"reliability", "text_reliability", "image_reliability", "text_generality", "image_generality"}
    keys |= {"text_locality", "image_locality", "portability", "robustness"}
    keys |= {f"portability_hop{h}" for h in range(1, 5)} | {f"robustness_{a.value}" for a in AttackType}
    keys |= {"in_domain_generality", "in_domain_locality", "compositional", "m_acc", "h_acc"}
    keys |= {f"textual_edit_{k}" for k in ("reliability", "generality", "locality")}
    keys |= {
        f"{m}_{g}" for m in ("kgi", "kpi") for g in ("img_topk", "txt_topk", "img_last_topk", "txt_last_topk")
    }
    keys |= {f"{m}_hop{h}" for m in ("m_acc", "h_acc") for h in range(1, 5)}
    specs = {s.key: s for s in metric_specs()}
    assert set(specs) == keys == set(metric_registry.names())
    assert specs["text_locality"].label == "T-Loc" and specs["text_locality"].reads == (
        ProbeKind.TEXT_LOCALITY,
    )
    assert specs["portability_hop2"].parent == "portability" and specs["portability_hop2"].label == "Port-2"
    assert all(s.help and s.name and s.paper and s.aggregate for s in specs.values())
    # declared in VLKEB's column order: the headline metrics first
    assert [s.key for s in metric_specs()][:3] == ["reliability", "text_reliability", "image_reliability"]


# ---------------------------------------------------------------- golden case and summary

# Case A, hand-scored: (probe, post score, pre score).
CASE_A = [
    (probe(ProbeKind.RELIABILITY), score([1, 2], [1, 2]), score([1, 2], [0, 0])),  # 1.0 (base 0)
    (probe(ProbeKind.TEXT_GENERALITY), score([1, 2, 3, 4], [1, 2, 0, 0]), score([1, 2, 3, 4], [0] * 4)),  # .5
    (probe(ProbeKind.IMAGE_GENERALITY), score([1, 1], [1, 0]), score([1, 1], [0, 0])),  # 0.5
    (probe(ProbeKind.IMAGE_GENERALITY), score([5], [5]), score([5], [0])),  # 1.0 -> mean 0.75, em 0.5
    (probe(ProbeKind.TEXT_LOCALITY), score([0] * 4, [7, 8, 9, 0]), score([0] * 4, [7, 8, 9, 10])),  # 0.75
    (probe(ProbeKind.IMAGE_LOCALITY), score([0, 0], [3, 4]), score([0, 0], [3, 4])),  # 1.0
    (probe(ProbeKind.PORTABILITY, hop=1), score([1, 2], [1, 0]), score([1, 2], [1, 9])),  # 0.5 (base 0.5)
    (probe(ProbeKind.PORTABILITY, hop=2), score([1, 2, 3], [0, 0, 3]), score([1, 2, 3], [0, 0, 0])),  # 1/3
    (probe(ProbeKind.ROBUSTNESS, attack=AttackType.PSEUDO_AUTHORITY), score([1], [1]), score([1], [0])),
    (
        probe(ProbeKind.ROBUSTNESS, attack=AttackType.VAGUE_WORDING),
        score([1, 2], [0, 0]),
        score([1, 2], [0, 0]),
    ),
]


def _case_a() -> CaseScores:
    probes, post, pre = zip(*CASE_A, strict=True)
    return score_case(probes, post, pre)


def test_golden_case_metrics() -> None:
    part = _case_a()
    assert part.metrics == pytest.approx(
        {
            "reliability": 1.0,
            "text_generality": 0.5,
            "image_generality": 0.75,
            "text_locality": 0.75,
            "image_locality": 1.0,
            "portability": (0.5 + 1 / 3) / 2,  # mean over all portability probes of the case
            "portability_hop1": 0.5,
            "portability_hop2": 1 / 3,
            "robustness": 0.5,
            "robustness_pseudo_authority": 1.0,
            "robustness_vague_wording": 0.0,
        }
    )
    assert part.exact_match["image_generality"] == 0.5
    assert part.exact_match["text_locality"] == 0.0
    assert part.exact_match["portability"] == 0.0
    assert part.base["reliability"] == 0.0
    assert part.base["portability_hop1"] == 0.5
    assert part.base["text_locality"] == 1.0  # the unedited model agrees with itself
    assert len(part.probes) == len(CASE_A) and part.probes[4].agreement == 0.75


def test_case_metrics_is_a_mean_over_the_probes_of_each_key() -> None:
    results = [
        ProbeResult("portability", 1, None, 1.0, 1.0, 0.0),
        ProbeResult("portability", 2, None, 0.0, 0.0, 0),
    ]
    acc = case_values(results)
    assert acc == {"portability": 0.5, "portability_hop1": 1.0, "portability_hop2": 0.0}
    assert case_values(results, "exact_match") == acc


def _record(case_id: str, edit_type: str, part: dict, eff: dict, status: str = "ok") -> dict:
    run = {"model": "world", "method": "ft_llm", "protocol": "single", "gap": None, "checkpoint": None}
    run |= {
        "benchmark": "world",
        "benchmark_version": "1",
        "seed": 0,
        "config_hash": "abc",
        "scoring": "mmke",
    }
    head = {"schema": "mmke-case/1", "run": run, "case_id": case_id, "edit_type": edit_type, "index": 0}
    return head | {"edit": {"prompt": "q", "target": "a", "ground_truth": None}}, {
        "status": status,
        **{k: part[k] for k in ("metrics", "exact_match", "base")},
        "efficiency": eff,
    }


def _golden_records() -> list[CaseRecord]:
    a = vars(_case_a())
    b = {
        "metrics": {"reliability": 0.5, "portability": 1.0, "portability_hop1": 1.0},
        "exact_match": {"reliability": 0.0, "portability": 1.0, "portability_hop1": 1.0},
        "base": {"reliability": 0.0, "portability": 0.0, "portability_hop1": 0.0},
    }
    c = {"metrics": {"reliability": 0.0}, "exact_match": {"reliability": 0.0}, "base": {"reliability": 0.0}}
    effs = [
        {"edit_seconds": 1.0, "score_seconds": 0.5, "peak_memory_mb": 100.0, "edited_params": 10},
        {"edit_seconds": 3.0, "score_seconds": 1.5, "peak_memory_mb": 300.0, "edited_params": 30},
        {"edit_seconds": 99.0, "score_seconds": 9.0, "peak_memory_mb": 9.0, "edited_params": 9},
    ]
    parts = [
        _record("A", "visual_entity", a, effs[0]),
        _record("B", "user_specific", b, effs[1]),
        _record("C", "visual_entity", c, effs[2], status="collapsed"),
    ]
    return [CaseRecord.from_dict(head | body) for head, body in parts]


def test_golden_summary() -> None:
    summary = summarize(_golden_records())
    assert summary.schema == "mmke-summary/1"
    common = {
        "benchmark": "world",
        "benchmark_version": "1",
        "config_hash": "abc",
        "scoring": "mmke",
        "seed": 0,
    }
    assert summary.run.to_dict() == common
    groups = {g.edit_type: g for g in summary.groups}
    assert [g.edit_type for g in summary.groups] == ["all", "user_specific", "visual_entity"]
    every = groups["all"]
    assert (every.n_cases, every.n_collapsed) == (3, 1)
    assert every.metrics["reliability"] == 0.75  # (A 1.0 + B 0.5) / 2; collapsed C excluded
    assert every.metrics["text_generality"] == 0.5  # only A has it
    assert every.metrics["portability_hop1"] == 0.75  # (0.5 + 1.0) / 2
    assert every.metrics["portability"] == round(((0.5 + 1 / 3) / 2 + 1.0) / 2, 6)
    assert every.exact_match["portability_hop1"] == 0.5
    assert every.base["portability_hop1"] == 0.25
    assert every.portability_relative_change == {"portability_hop1": 2.0, "portability_hop2": None}
    assert every.efficiency == {
        "edit_seconds": 2.0,
        "edited_params": 20.0,
        "peak_memory_mb": 200.0,
        "score_seconds": 1.0,
    }
    visual = groups["visual_entity"]
    assert (visual.n_cases, visual.n_collapsed) == (2, 1)
    assert visual.metrics["reliability"] == 1.0
    assert visual.metrics["portability_hop2"] == 0.333333
    assert visual.portability_relative_change["portability_hop1"] == 0.0
    assert groups["user_specific"].portability_relative_change == {"portability_hop1": None}


def test_summary_is_order_independent() -> None:
    records = _golden_records()
    for i in range(20):  # extra cases with awkward floats, so summation order would show
        extra = {"metrics": {"reliability": 0.1 * (i % 7) + 1e-9 * i}, "exact_match": {}, "base": {}}
        head, body = _record(f"x{i}", "visual_semantic", extra, {"edit_seconds": 0.3 + i / 3})
        record = head | body | {"run": {**head["run"], "method": ["ike", "ft_llm"][i % 2]}}
        records.append(CaseRecord.from_dict(record))
    expected = summarize(records).to_json()
    rng = random.Random(0)
    for _ in range(10):
        rng.shuffle(records)
        assert summarize(records).to_json() == expected
