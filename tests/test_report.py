"""Report tables, plots, the HTML page and run comparison, on a synthetic run written to tmp."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mmke.errors import MmkeError
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
    edit_type_table,
    efficiency_table,
    latex_escape,
    main_table,
    portability_table,
    progression_table,
    robustness_table,
)

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


def _group(method: int, protocol: str = "single", edit_type: str = "all", gap: int | None = None) -> dict:
    shift = 0.0 if gap is None else gap / 100
    metrics = _metrics(method, shift)
    base = _base()
    return {
        "model": MODEL,
        "method": METHODS[method],
        "protocol": protocol,
        "gap": gap,
        "checkpoint": None,
        "edit_type": edit_type,
        "n_cases": 40,
        "n_collapsed": 1 if gap == 20 and method == 0 else 0,
        "metrics": metrics,
        "exact_match": {k: round(v / 2, 4) for k, v in metrics.items()},
        "base": base,
        "portability_relative_change": {
            f"portability_hop{h + 1}": (metrics[f"portability_hop{h + 1}"] - b) / b
            for h, b in enumerate(BASE_HOPS)
        },
        "efficiency": {
            "edit_seconds": (0.41, 0.02)[method],
            "score_seconds": 0.05,
            "peak_memory_mb": (812.5, 640.0)[method],
            "edited_params": (2_097_152, 0)[method],
        },
    }


def _summary() -> dict[str, Any]:
    groups = []
    for m in range(len(METHODS)):
        groups.append(_group(m))
        groups += [_group(m, edit_type=t) for t in EDIT_TYPES]
        groups += [_group(m, "sequential", gap=g) for g in (10, 20)]
    run = {"model": MODEL, "method": list(METHODS), "benchmark": "world", "protocol": "single", "seed": 0}
    return {"schema": "mmke-summary/1", "run": run, "groups": groups}


def _record(method: int, index: int, protocol: str = "single", status: str = "ok") -> dict:
    probes = [
        {"kind": "reliability", "hop": None, "attack": None, "token_accuracy": 1.0, "exact_match": 1.0,
         "nll": 0.1, "agreement": None, "generated": "paris <b>", "generated_match": 1.0},
        {"kind": "portability", "hop": 2, "attack": None, "token_accuracy": 0.5, "exact_match": 0.0,
         "nll": 2.0, "agreement": None, "generated": "berlin", "generated_match": 0.0},
    ]  # fmt: skip
    return {
        "schema": "mmke-case/1",
        "run": {"model": MODEL, "method": METHODS[method], "protocol": protocol, "gap": None, "seed": 0},
        "case_id": f"world-{index:04d}",
        "edit_type": EDIT_TYPES[index % len(EDIT_TYPES)],
        "index": index,
        "status": status,
        "message": None if status == "ok" else f"NaN logits after {index} edits",
        "collapsed_at": index if status == "collapsed" else None,
        "edit": {"prompt": f"Where was person {index} born?", "target": "Paris"},
        "metrics": _metrics(method),
        "exact_match": _metrics(method),
        "base": _base(),
        "probes": probes,
        "efficiency": {
            "edit_seconds": 0.4,
            "score_seconds": 0.05,
            "peak_memory_mb": 800.0,
            "edited_params": 10,
        },
    }


def _write_run(root: Path, summary: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary or _summary()))
    records = [_record(m, i) for m in range(2) for i in range(6)]
    records += [_record(0, 30, "sequential", "collapsed"), _record(1, 31, "single", "error")]
    (root / "cases.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n{cut mid-wri")
    (root / "config.yaml").write_text("model: llava-world\nmethods: [ft_llm, ike]\nseed: 0\n")
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _write_run(tmp_path / "runs" / "r1")


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
    for g in summary["groups"]:
        g["method"] = g["method"].replace("ike", "ike_10%")
    tex = render_latex(main_table(summary))
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
    assert {p.name for p in paths} == {"portability_hops.png", "sequential.png", "efficiency.png"}
    for p in paths:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert make_plots({"groups": []}, tmp_path / "none") == []


def test_report_html_is_self_contained(run_dir: Path) -> None:
    page = write_report(run_dir).read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 3
    assert "NaN logits after 30 edits" in page and "1 unreadable line" in page
    assert "Where was person 0 born?" in page and "paris &lt;b&gt;" in page
    assert "Port-1" in page and "Vague" in page and "Collapsed" in page
    for name in ("main.md", "main.csv", "main.tex", "portability_hops.tex", "generation.md", "tables.json"):
        assert (run_dir / "tables" / name).is_file()
    assert (run_dir / "plots" / "sequential.png").is_file()


def test_compare_runs_shows_delta(tmp_path: Path) -> None:
    better = copy.deepcopy(_summary())
    for g in better["groups"]:
        g["metrics"]["reliability"] -= 0.05
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", better)
    rows = _md_rows(compare_runs(a, b))
    assert rows[0][2:5] == ["Rel A", "Rel B", "Rel Δ"]
    assert rows[2][1] == "ft\\_llm" and rows[2][2:5] == ["99.1", "94.1", "-5.0"]


def test_missing_summary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MmkeError, match=r"no summary\.json"):
        write_report(tmp_path)
