"""The run store: config saved with a hash, durable appends, torn-tail repair, SIGKILL safety, resume keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmke.errors import BadRecordError, ConfigError
from mmke.eval import RunStore, config_hash
from mmke.eval.records import CaseRecord, EditText, GroupSummary, RunBlock, RunInfo, RunSummary

CONFIG = {"benchmark": "world", "methods": ("ft_llm", "ike"), "limit": 5, "method_options": {"ike": {"k": 4}}}


def rec(case_id: str, method: str = "ft_llm", gap: int | None = None) -> CaseRecord:
    run = RunBlock(method=method, gap=gap)
    return CaseRecord(run, case_id, "visual_entity", 0, EditText("é ü", "x"), metrics={"reliability": 1.0})


def test_create_saves_config_and_hash_and_open_reads_them(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "runs", "r1", CONFIG)
    assert store.path == tmp_path / "runs" / "r1" and store.run_id == "r1"
    saved = yaml.safe_load((store.path / "config.yaml").read_text())
    assert saved == {**CONFIG, "methods": ["ft_llm", "ike"]}
    assert (store.path / "config_hash").read_text().strip() == store.config_hash == config_hash(CONFIG)
    again = RunStore.open(store.path)
    assert (again.config, again.config_hash) == (store.config, store.config_hash)


def test_create_refuses_an_existing_run_and_open_refuses_a_non_run(tmp_path: Path) -> None:
    RunStore.create(tmp_path, "r1", CONFIG)
    with pytest.raises(ConfigError, match="already exists; resume it"):
        RunStore.create(tmp_path, "r1", CONFIG)
    with pytest.raises(ConfigError, match="bad run id"):
        RunStore.create(tmp_path, "../x", CONFIG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not an mmke run"):
        RunStore.open(tmp_path / "empty")


def test_open_refuses_a_config_edited_after_the_start(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    (store.path / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "limit": 6}))
    with pytest.raises(ConfigError, match="edited after the run started"):
        RunStore.open(store.path)


def test_generated_run_ids_are_distinct(tmp_path: Path) -> None:
    a, b = RunStore.create(tmp_path, None, CONFIG), RunStore.create(tmp_path, None, CONFIG)
    assert a.path != b.path
    assert a.run_id.split("-")[2] == config_hash(CONFIG)[:8]


def test_append_and_read_round_trip(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    records = [rec("a"), rec("b"), rec("c")]
    for r in records:
        store.append(r)
    assert store.records() == records
    assert RunStore.open(store.path).records() == records
    lines = store.cases_path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == json.dumps(
        records[0].to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":")
    )
    assert all(CaseRecord.from_json(line).to_json() == line for line in lines)


def test_a_record_of_an_unknown_schema_or_shape_is_one_line_naming_file_and_line(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    store.append(rec("a"))
    good = store.cases_path.read_text(encoding="utf-8")
    newer = json.dumps({**rec("b").to_dict(), "schema": "mmke-case/9"})
    store.cases_path.write_text(good + newer + "\n", encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"cases.jsonl:2: schema 'mmke-case/9'"):
        store.records()
    store.cases_path.write_text(good + '{"case_id": "c"}\n', encoding="utf-8")
    with pytest.raises(BadRecordError, match=r"cases.jsonl:2: .*missing"):
        store.records()


def test_torn_last_line_is_dropped_and_repaired_on_append(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    store.append(rec("a"))
    store.append(rec("b"))
    with open(store.cases_path, "ab") as f:
        f.write(b'{"case_id":"c","metrics":{"relia')  # a kill mid-write
    assert [r.case_id for r in store.records()] == ["a", "b"]
    store.append(rec("d"))
    text = store.cases_path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert [json.loads(line)["case_id"] for line in text.splitlines()] == ["a", "b", "d"]


def test_complete_json_without_its_newline_counts_as_torn(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    with open(store.cases_path, "w") as f:
        f.write(rec("a").to_json())
    assert store.records() == []
    store.append(rec("b"))
    assert [r.case_id for r in store.records()] == ["b"]


CHILD = """
import os
import sys
from pathlib import Path
from mmke.eval import RunStore
from mmke.eval.records import CaseRecord, EditText, RunBlock
store = RunStore.open(Path(sys.argv[1]))
marker = Path(sys.argv[2])
pad = "x" * 200_000  # large lines make a kill mid-write likely
for i in range(100_000):
    store.append(CaseRecord(RunBlock(method="ft_llm"), f"c{i}", "visual_entity", i, EditText(pad, "x")))
    # atomic, so a kill can never leave the parent an empty or half-written count
    marker.with_suffix(".tmp").write_text(str(i + 1))
    os.replace(marker.with_suffix(".tmp"), marker)
"""


def test_sigkill_mid_run_loses_at_most_the_case_in_flight(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(store.path), str(marker)])
    try:
        deadline = time.monotonic() + 20
        while not (marker.exists() and int(marker.read_text()) >= 5):
            assert child.poll() is None, "child exited early"
            assert time.monotonic() < deadline, "child wrote no records"
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    acknowledged = int(marker.read_text())
    ids = [r.case_id for r in store.records()]
    assert ids == [f"c{i}" for i in range(len(ids))]  # in order, no duplicates, no partial record
    assert acknowledged <= len(ids) <= acknowledged + 1  # every acknowledged append survived
    store.append(rec("after"))
    lines = store.cases_path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["case_id"] for line in lines][-1] == "after"


def test_done_keys_identify_finished_cases(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    store.append(rec("a"))
    store.append(rec("a", gap=10))
    store.append(rec("b", method="ike"))
    assert store.done_keys() == {
        ("ft_llm", "single", None, None, "a"),
        ("ft_llm", "single", 10, None, "a"),
        ("ike", "single", None, None, "b"),
    }
    assert rec("b", method="ike").key in store.done_keys()
    assert rec("c").key not in store.done_keys()


def test_write_summary_replaces_atomically(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r1", CONFIG)
    assert store.read_summary() is None
    group = GroupSummary("world", "ft_llm", "single", None, None, "all", 1, 0, 0, {"reliability": 1.0})
    store.write_summary(RunSummary(RunInfo(), ()))
    store.write_summary(RunSummary(RunInfo(config={"limit": 1}), (group,)))
    assert store.read_summary() == RunSummary(RunInfo(config={"limit": 1}), (group,))
    assert sorted(p.name for p in store.path.iterdir()) == [
        "cases.jsonl",
        "config.yaml",
        "config_hash",
        "summary.json",
    ]
