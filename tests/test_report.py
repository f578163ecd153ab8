"""Report tables, plots, the HTML page and run comparison, on a synthetic run written to tmp."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mmke.cli import main
from mmke.errors import MmkeError
from mmke.eval import metrics as metric_module
from mmke.eval.metrics import metric, metric_specs, score_case, summarize
from mmke.eval.records import (
    CaseRecord,
    EditText,
    GroupSummary,
    ProbeResult,
    RunBlock,
    RunInfo,
    RunSummary,
)
from mmke.models.scoring import ItemScore
from mmke.registry import metrics as metric_registry
from mmke.report import (
    compare_runs,
    render_csv,
    render_latex,
    render_markdown,
    rich_table,
    write_report,
)
from mmke.report.plots import make_plots
from mmke.report.tables import (
    MMKE_BENCH_ORDER,
    MMKE_ORDER,
    SEQUENTIAL_ORDER,
    attack_keys,
    declared_order,
    edit_type_table,
    efficiency_table,
    generation_table,
    hop_keys,
    latex_escape,
    main_table,
    metric_label,
    portability_table,
    progression_table,
    relative_change,
    robustness_table,
)
from mmke.types import Probe, ProbeKind

OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"
MODEL = "llava-world"
METHODS = ("ft_llm", "ike")
ATTACKS = (
    "pseudo_authority",
    "feature_confusion",
    "misleading_context",
    "irrelevant_details",
    "vague_wording",
)
EDIT_TYPES = ("visual_entity", "visual_semantic", "user_specific", "medical_mcq")
KEYS = (
    "reliability",
    "text_reliability",
    "image_reliability",
    "text_generality",
    "image_generality",
    "text_locality",
    "image_locality",
    "portability",
    *(f"portability_hop{h}" for h in range(1, 5)),
    "robustness",
    *(f"robustness_{a}" for a in ATTACKS),
)
BASE_HOPS = (0.4, 0.3, 0.2, 0.1)


def _metrics(method: int, shift: float = 0.0) -> dict[str, float]:
    """Deterministic values in [0, 1]; reliability pinned so one cell can be checked by hand."""
    values = {k: round(0.3 + 0.06 * ((method * 7 + j * 3) % 10) - shift, 4) for j, k in enumerate(KEYS)}
    values["reliability"] = (0.9912, 0.9998)[method]
    for h in range(4):  # ft_llm hop1 = 0.6 against base 0.4: relative change +50 %
        values[f"portability_hop{h + 1}"] = round((0.6, 0.7)[method] - 0.1 * h, 4)
    return values


def _base() -> dict[str, float]:
    base = dict.fromkeys(KEYS, 0.1)
    base.update({f"portability_hop{h + 1}": v for h, v in enumerate(BASE_HOPS)})
    return base


def _group(
    method: int, protocol: str = "single", edit_type: str = "all", gap: int | None = None
) -> GroupSummary:
    shift = 0.0 if gap is None else gap / 100
    metrics = _metrics(method, shift)
    return GroupSummary(
        model=MODEL,
        method=METHODS[method],
        protocol=protocol,
        gap=gap,
        checkpoint=None,
        edit_type=edit_type,
        n_cases=40,
        n_collapsed=1 if gap == 20 and method == 0 else 0,
        n_error=0,
        metrics=metrics,
        exact_match={k: round(v / 2, 4) for k, v in metrics.items()},
        base=_base(),
        portability_relative_change=metric_module.relative_change(metrics, _base()),
        # free generation finds half of what teacher forcing credits (single editing only)
        generated={k: round(v / 2, 4) for k, v in metrics.items()} if protocol == "single" else {},
        base_generated={k: 0.05 for k in KEYS} if protocol == "single" else {},
        efficiency={
            "edit_seconds": (0.41, 0.02)[method],
            "score_seconds": 0.05,
            "peak_memory_mb": (812.5, 640.0)[method],
            "edited_params": (2_097_152, 0)[method],
        },
    )


def _summary() -> RunSummary:
    groups = []
    for m in range(len(METHODS)):
        groups.append(_group(m))
        groups += [_group(m, edit_type=t) for t in EDIT_TYPES]
        groups += [_group(m, "sequential", gap=g) for g in (10, 20)]
    run = {"model": MODEL, "method": list(METHODS), "benchmark": "world", "protocol": "single", "seed": 0}
    return RunSummary(RunInfo(common=run), tuple(groups))


def _record(method: int, index: int, protocol: str = "single", status: str = "ok") -> CaseRecord:
    probes = (
        ProbeResult("reliability", None, None, 1.0, 1.0, 0.1, None, "paris <b>", 1.0),
        ProbeResult("portability", 2, None, 0.5, 0.0, 2.0, None, "berlin", 0.0),
        # every target token right when fed, but the model's own answer is another
        ProbeResult("image_generality", None, None, 1.0, 1.0, 0.1, None, "rome, surely", 0.0),
    )
    return CaseRecord(
        run=RunBlock(model=MODEL, method=METHODS[method], protocol=protocol, seed=0),
        case_id=f"world-{index:04d}",
        edit_type=EDIT_TYPES[index % len(EDIT_TYPES)],
        index=index,
        edit=EditText(f"Where was person {index} born?", "Paris"),
        status=status,
        message=None if status == "ok" else f"NaN logits after {index} edits",
        collapsed_at=index if status == "collapsed" else None,
        efficiency={"edit_seconds": 0.4, "score_seconds": 0.05, "peak_memory_mb": 800.0, "edited_params": 10},
        metrics=_metrics(method),
        exact_match=_metrics(method),
        base=_base(),
        probes=probes,
    )


def _write_run(
    root: Path, summary: RunSummary | None = None, records: Sequence[CaseRecord] | None = None, tail: str = ""
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text((summary or _summary()).to_json())
    if records is None:
        records = [_record(m, i) for m in range(2) for i in range(6)]
        records += [_record(0, 30, "sequential", "collapsed"), _record(1, 31, "single", "error")]
    (root / "cases.jsonl").write_text("".join(r.to_json() + "\n" for r in records) + tail)
    (root / "config.yaml").write_text("model: llava-world\nmethods: [ft_llm, ike]\nseed: 0\n")
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "runs" / "r1", tail="{cut mid-wri")


def _md_rows(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]


def test_main_table_header_order_and_a_cell() -> None:
    rows = _md_rows(render_markdown(main_table(_summary())))
    assert rows[0] == [
        "Model",
        "Method",
        "Rel",
        "T-Rel",
        "I-Rel",
        "T-Gen",
        "I-Gen",
        "T-Loc",
        "I-Loc",
        "Port",
        "Rob",
        "N",
    ]
    assert [r[1] for r in rows[2:]] == ["unedited", "ft\\_llm", "ike"]
    ft = rows[3]
    assert ft[2] == "99.1"  # 0.9912 as a percentage, 1 decimal; ike's 99.98 is the bold best
    assert rows[4][2] == "**100.0**"
    assert ft[0] == ""  # the model is named once per block, like the paper


def test_exact_match_variant_has_no_base_row() -> None:
    table = main_table(_summary(), "exact_match")
    assert table is not None and table.name == "main_exact"
    assert [r[1] for r in table.rows] == list(METHODS)
    assert table.rows[0][2] == pytest.approx(49.56)


def test_edit_type_table_follows_mmke_bench() -> None:
    table = edit_type_table(_summary())
    assert table.columns[3:9] == ("T-Loc", "I-Loc", "Rel", "T-Rel", "I-Rel", "T-Gen")
    types = list(dict.fromkeys(r[1] for r in table.rows))
    assert types == ["Visual Entity", "Visual Semantic", "User-Specific", "Medical MCQ", "All"]


def test_portability_relative_change() -> None:
    table = portability_table(_summary())
    assert table.columns == ("Model", "Method", "Port-1", "Port-2", "Port-3", "Port-4",
                             "ΔPort-1", "ΔPort-2", "ΔPort-3", "ΔPort-4")  # fmt: skip
    base, ft = table.rows[0], table.rows[1]
    assert base[1] == "unedited" and base[2] == pytest.approx(40.0) and base[6] is None
    assert ft[2] == pytest.approx(60.0) and ft[6] == pytest.approx(50.0)
    assert "| +50.0 |" in render_markdown(table)


def test_robustness_and_sequential_and_efficiency() -> None:
    summary = _summary()
    rob = robustness_table(summary)
    assert rob.columns[2:] == ("Rel", "Rob", "Authority", "Confusion", "Misleading", "Irrelevant", "Vague")
    seq = progression_table(summary)
    assert [(r[1], r[2]) for r in seq.rows] == [("ft_llm", 10), ("ft_llm", 20), ("ike", 10), ("ike", 20)]
    assert seq.columns[-1] == "Collapsed" and seq.rows[1][-1] == 1
    eff = efficiency_table(summary)
    assert "| 2,097,152 |" in render_markdown(eff)


def test_csv_parses_back() -> None:
    table = main_table(_summary())
    parsed = list(csv.reader(io.StringIO(render_csv(table))))
    assert tuple(parsed[0]) == table.columns
    assert len(parsed) == 1 + len(table.rows)
    assert parsed[2][1] == "ft_llm" and float(parsed[2][2]) == pytest.approx(99.12)


def test_latex_is_booktabs_and_escaped() -> None:
    summary = _summary()
    renamed = replace(
        summary, groups=tuple(replace(g, method=g.method.replace("ike", "ike_10%")) for g in summary.groups)
    )
    tex = render_latex(main_table(renamed))
    assert tex.startswith("\\begin{tabular}{ll")
    assert "\\toprule" in tex and "\\bottomrule" in tex and tex.rstrip().endswith("\\end{tabular}")
    assert "ike\\_10\\%" in tex and "ft\\_llm" in tex
    assert "\\textbf{100.0}" in tex
    assert latex_escape("a_b & 5% #1 {x} ~^\\") == (
        "a\\_b \\& 5\\% \\#1 \\{x\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}"
    )


def test_rich_table_renders() -> None:
    console = Console(record=True, width=200)
    console.print(rich_table(main_table(_summary())))
    text = console.export_text()
    assert "T-Gen" in text and "99.1" in text


def test_plots_are_png_and_skip_without_data(tmp_path: Path) -> None:
    paths = make_plots(_summary(), tmp_path / "plots")
    assert {p.name for p in paths} == {
        "portability_hops.png",
        "sequential.png",
        "efficiency.png",
        "generation_gap.png",
    }
    for p in paths:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert make_plots(RunSummary(RunInfo(), ()), tmp_path / "none") == []


def test_report_html_is_self_contained(run_dir: Path) -> None:
    page = write_report(run_dir).read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 4
    assert "NaN logits after 30 edits" in page and "1 unreadable line" in page
    assert f"{run_dir / 'cases.jsonl'}:15: not a JSON record" in page  # the cut line, named
    assert "Where was person 0 born?" in page and "paris &lt;b&gt;" in page
    assert "Port-1" in page and "Vague" in page and "Collapsed" in page
    assert "Teacher forcing says yes, generation says no" in page and "rome, surely" in page
    assert "12 probe(s) with every target token right under teacher forcing" in page
    for name in (
        "main.md",
        "main.csv",
        "main.tex",
        "portability_hops.tex",
        "teacher_vs_generated.md",
        "tables.json",
    ):
        assert (run_dir / "tables" / name).is_file()
    assert (run_dir / "plots" / "sequential.png").is_file()


def test_compare_runs_shows_delta(tmp_path: Path) -> None:
    summary = _summary()
    lower = [
        replace(g, metrics={**g.metrics, "reliability": g.metrics["reliability"] - 0.05})
        for g in summary.groups
    ]
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", replace(summary, groups=tuple(lower)))
    rows = _md_rows(compare_runs(a, b))
    assert rows[0][2:5] == ["Rel A", "Rel B", "Rel Δ"]
    assert rows[2][1] == "ft\\_llm" and rows[2][2:5] == ["99.1", "94.1", "-5.0"]


def test_missing_summary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MmkeError, match=r"no summary\.json"):
        write_report(tmp_path)


# ---------------------------------------------------------------- labels and orders are declared once


def test_labels_and_orders_are_the_metric_declarations() -> None:
    specs = metric_specs()
    assert [metric_label(s.key) for s in specs] == [s.label for s in specs]
    assert metric_label("a_metric_no_one_declares") == "a_metric_no_one_declares"
    hops = [s.key for s in specs if s.parent == "portability"]
    attacks = [s.key for s in specs if s.parent == "robustness"]
    assert hop_keys([*reversed(hops), "reliability"]) == hops
    assert attack_keys([*reversed(attacks), "robustness"]) == attacks
    assert declared_order(["zz_old", hops[1], "reliability"]) == ["reliability", hops[1], "zz_old"]
    declared = {s.key for s in specs}
    for layout in (MMKE_ORDER, MMKE_BENCH_ORDER, SEQUENTIAL_ORDER):
        assert set(layout) <= declared


def test_relative_change_is_the_stored_one_else_computed_by_metrics() -> None:
    group = _group(0)
    odd = replace(group, portability_relative_change={"portability_hop1": 9.5, "portability_hop2": None})
    assert relative_change(odd, "portability_hop1") == 9.5  # read, not recomputed
    assert relative_change(odd, "portability_hop2") is None
    old = replace(group, portability_relative_change={})  # a summary from before the field
    assert relative_change(old, "portability_hop1") == pytest.approx(0.5)  # (0.6 - 0.4) / 0.4


# ---------------------------------------------------------------- a metric registered in one place


@pytest.fixture
def worst_target(monkeypatch: pytest.MonkeyPatch) -> str:
    """A toy metric registered only here, with the decorator; the registry is put back after."""
    metric_specs()  # the declared metrics first, so the toy one is declared last
    monkeypatch.setattr(metric_registry, "_items", dict(metric_registry._items))
    monkeypatch.setattr(metric_registry, "_help", dict(metric_registry._help))
    kinds = (ProbeKind.RELIABILITY, ProbeKind.TEXT_GENERALITY)

    @metric(
        "worst_target",
        label="Worst",
        name="Worst target probe",
        paper="toy",
        reads=kinds,
        help="the lowest score among a case's target probes",
    )
    def _worst(results: Sequence[ProbeResult], measure: str) -> float | None:
        values = [getattr(r, measure) for r in results if r.kind in {k.value for k in kinds}]
        return min(values) if values else None

    return "worst_target"


def _item(argmax: list[int]) -> ItemScore:
    """A two-token answer [1, 2] scored by hand (as tests/test_metrics.py does)."""
    target, top1 = torch.tensor([1, 2]), torch.tensor(argmax)
    accuracy = float((target == top1).float().mean())
    return ItemScore(target, top1, top1[:, None], accuracy, accuracy == 1.0, 1.0)  # top-k: (2, 1)


def _scored_records() -> list[CaseRecord]:
    """Two cases of reliability + text generality: the worst probe scores 0.5, then 0.0."""
    probes = [
        Probe(kind=k, prompt="q", target="a") for k in (ProbeKind.RELIABILITY, ProbeKind.TEXT_GENERALITY)
    ]
    unedited = [_item([0, 0]), _item([0, 0])]
    records = []
    for index, post in enumerate(([_item([1, 2]), _item([1, 0])], [_item([0, 0]), _item([1, 2])])):
        scores = score_case(probes, post, unedited)
        records.append(
            CaseRecord(
                run=RunBlock(model="toy", method="ft_llm"),
                case_id=f"toy-{index}",
                edit_type="visual_entity",
                index=index,
                edit=EditText("q", "a"),
                metrics=scores.metrics,
                exact_match=scores.exact_match,
                base=scores.base,
                probes=scores.probes,
            )
        )
    return records


def test_a_metric_registered_once_reaches_the_main_table_and_the_page(
    worst_target: str, tmp_path: Path
) -> None:
    records = _scored_records()
    assert [r.metrics[worst_target] for r in records] == [0.5, 0.0]
    summary = summarize(records)
    table = main_table(summary)
    assert table is not None and table.columns == ("Model", "Method", "Rel", "T-Gen", "Worst", "N")
    assert [row[1:5] for row in table.rows] == [("unedited", 0.0, 0.0, 0.0), ("ft_llm", 50.0, 75.0, 25.0)]
    run = _write_run(tmp_path / "toy", summary, records)
    page = write_report(run).read_text()
    assert '<th class="num">Worst</th>' in page  # the main tables' column
    assert '<td class="">Worst</td>' in page  # the example case's row
    assert "| Worst |" in (run / "tables" / "main.md").read_text()


# ---------------------------------------------------------------- a run written by an older mmke


def test_an_old_run_folder_still_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(OLD_RUN, tmp_path / "old_run"))
    assert main(["report", str(run)]) == 0
    assert "Single editing (token accuracy, %)" in capsys.readouterr().out
    assert (run / "report.html").is_file() and (run / "tables" / "main.md").is_file()
    main_md = (run / "tables" / "main.md").read_text()
    assert (
        "| Model | Method | Rel | T-Rel | I-Rel | T-Gen | I-Gen | T-Loc | I-Loc | Port | Rob | N |" in main_md
    )


def test_an_old_run_reads_back_byte_identically() -> None:
    lines = (OLD_RUN / "cases.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines
    for n, line in enumerate(lines, 1):
        assert CaseRecord.from_json(line, f"old_run/cases.jsonl:{n}").to_json() == line
    text = (OLD_RUN / "summary.json").read_text(encoding="utf-8")
    assert RunSummary.from_json(text).to_json() == text


def test_teacher_forced_vs_generated_table() -> None:
    table = generation_table(_summary())
    assert table is not None and table.columns[:3] == ("Model", "Method", "Answered")
    rows = {(r[1], r[2]): r for r in table.rows}
    assert set(rows) == {
        ("unedited", "teacher-forced"),
        ("unedited", "generated"),
        *((m, e) for m in METHODS for e in ("teacher-forced", "generated", "gap (gen − tf)")),
    }
    rel = table.columns.index("Rel")
    assert rows[("ft_llm", "teacher-forced")][rel] == pytest.approx(99.12)
    assert rows[("ft_llm", "generated")][rel] == pytest.approx(49.56)
    assert rows[("ft_llm", "gap (gen − tf)")][rel] == pytest.approx(-49.56)
    teacher_only = replace(_summary(), groups=tuple(replace(g, generated={}) for g in _summary().groups))
    assert generation_table(teacher_only) is None
