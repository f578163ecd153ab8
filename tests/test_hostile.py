"""Issue 19's hostile-input suite: every reader, bad settings, bad model folders and process faults.

Each input goes through the CLI (``mmke.cli.main`` in-process, or ``python -m mmke.cli`` for kills
and signals) under a wall-clock limit, and its outcome is classified: ``ok`` (a legitimately odd
input accepted), ``clear`` (refused: exit 1 with ``file:line (case): problem`` lines, or exit 2
with one ``mmke: error:`` line), ``traceback`` (a traceback, an exception out of ``main`` or an
``internal error``), ``hang`` or ``wrong`` (a bad input accepted, a good one refused, or a refusal
that breaks the one-line contract). Records lost and leftover folders are counted too.

The counts are reported in one place (``test_the_counts_show_no_traceback_hang_or_loss``: a table
on stdout, JSON at ``$MMKE_HOSTILE_REPORT`` or in the test's temporary folder); every failing input
is listed by name with the first line the CLI printed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from _runs import small_overrides, without_timings
from hostile_inputs import (
    Child,
    Outcome,
    Result,
    Tally,
    broken,
    call_main,
    classify_validate,
    describe,
    finish,
    image_root,
    mutations,
    one_line_error,
    readers,
    run_cli,
    table,
)
from mmke.eval.records import CaseRecord
from mmke.eval.store import RunStore

#: Settings a run needs besides the ones a test spoils: one case, one method, one step.
QUICK = ("methods=[ft_llm]", "limit=1", "method_options.ft_llm.steps=1")
#: The process-fault runs: four cases, so a kill lands between records.
PLANNED = 4
FAULT_RUN = ("methods=[ft_llm]", f"limit={PLANNED}", "method_options.ft_llm.steps=2")


def _keyed(records: list[CaseRecord]) -> dict:
    """Records without timings, by resume key."""
    return dict(zip((r.key for r in records), without_timings(records), strict=True))


class Suite:
    """Runs each section once (whichever test asks first) and keeps every outcome in one ``Tally``."""

    SECTIONS = ("readers", "settings", "model_folders", "process")

    def __init__(self, tmp: pytest.TempPathFactory, setup: tuple[Path, Path]) -> None:
        self.tmp = tmp
        self.setup = setup
        self.tally = Tally()
        self.seconds: dict[str, float] = {}

    def run(self, section: str) -> list[str]:
        """The section's failures (running it first if no test has yet)."""
        if section not in self.tally.sections_run:
            self.tally.sections_run.add(section)
            start = time.perf_counter()
            getattr(self, f"_{section}")(self.tmp.mktemp(section))
            self.seconds[section] = round(time.perf_counter() - start, 1)
        return self.tally.failures(section)

    def add(self, section: str, category: str, name: str, verdict: str, detail: str, **counts: int) -> None:
        self.tally.add(Outcome(section, category, name, verdict, detail, **counts))

    # ------------------------------------------------------------ 1. every reader

    def _readers(self, tmp: Path) -> None:
        root, refs = image_root(tmp)
        for reader in readers(tmp / "native-source.jsonl"):
            for i, hostile in enumerate(mutations(reader, refs)):
                folder = tmp / reader.fmt / f"{i:03d}-{hostile.name}"
                folder.mkdir(parents=True)
                file = folder / reader.filename
                file.write_bytes(hostile.data)
                argv = ["validate", str(file), "--format", reader.fmt, "--image-root", str(root)]
                res = call_main([*argv, *hostile.options], limit_s=20)
                verdict, detail, lost = classify_validate(res, hostile, file)
                name = f"{reader.fmt}:{hostile.name}"
                self.add("readers", hostile.category, name, verdict, detail, records_lost=lost)
        for fmt in ("native", "vlkeb"):  # files that are not files
            for name, path in (("missing_file", tmp / "nope.json"), ("file_is_a_directory", tmp)):
                res = call_main(["validate", str(path), "--format", fmt, "--image-root", str(root)])
                self._refusal("readers", "malformed", f"{fmt}:{name}", res)
        res = call_main(["validate", str(tmp / "native-source.jsonl"), "--format", "nope"])
        self._refusal("readers", "malformed", "unknown_format", res)

    def _refusal(
        self, section: str, category: str, name: str, res: Result, out: Path | None = None, leftovers: int = 0
    ) -> None:
        """Record ``res`` as a refusal: exit 2 and one ``mmke: error:`` line (anything else counts).

        ``out``: a folder the refused command must leave empty (or absent); what is in it counts.
        """
        bad = broken(res)
        why = one_line_error(res)
        leftovers += _leftovers(out)
        if bad:
            self.add(section, category, name, bad, res.first_line(), leftovers=leftovers)
        elif why:
            self.add(section, category, name, "wrong", f"{why}: {res.first_line()}", leftovers=leftovers)
        else:
            self.add(section, category, name, "clear", res.first_line(), leftovers=leftovers)

    # ------------------------------------------------------------ 2. bad settings

    def _settings(self, tmp: Path) -> None:
        from mmke.models import LVLM

        afile, sentinel = tmp / "a-file", tmp / "PWNED"
        afile.write_text("x")
        resumes = _resume_folders(tmp / "resume", self.setup)
        before = {name: _snapshot(path) for name, path in resumes.items()}
        for name, extra in _bad_settings(tmp, afile, sentinel).items():
            out = tmp / "out" / name
            argv = ["run", *small_overrides(self.setup, out), *QUICK, *extra]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(LVLM, "load", _refuse_to_load)  # a setting accepted by mistake shows here
                res = call_main(argv, limit_s=60)
            if "ModelLoaded" in (res.escaped or ""):
                self.add("settings", "settings", name, "wrong", "accepted: the run went on to load the model")
            else:
                watched = afile if name.startswith("out_") else out
                self._refusal("settings", _settings_category(name), name, res, watched)
        for name, path in resumes.items():  # the model may load here: the records are read after it
            res = call_main(["run", "--resume", str(path)], limit_s=60)
            changed = _changed(path, before[name])
            self._refusal("settings", "resume", f"resume_{name}", res, leftovers=changed)
        if sentinel.exists():
            self.add("settings", "config", "yaml_code_execution", "wrong", f"a YAML tag ran code: {sentinel}")
        if afile.read_text() != "x":
            self.add("settings", "out", "out_file_untouched", "wrong", f"a refused run changed {afile}")

    # ------------------------------------------------------------ 3. bad model folders

    def _model_folders(self, tmp: Path) -> None:
        _, model = self.setup
        for name, spoil, expect in _model_spoilers():
            folder = tmp / "models" / name
            shutil.copytree(model, folder)
            model_arg = spoil(folder) or folder
            out = tmp / "out" / name
            extra = ["allow_pickle=true"] if name.endswith("_allowed") else []
            argv = ["run", *small_overrides(self.setup, out), *QUICK, f"model={model_arg}", *extra]
            res = call_main(argv, limit_s=120)
            if expect == "ok":
                bad = broken(res)
                verdict = bad or ("ok" if res.code == 0 else "wrong")
                detail = res.first_line() if res.code != 0 else "ran"
                self.add("model_folders", "model_folders", name, verdict, detail)
            else:
                self._refusal("model_folders", "model_folders", name, res, out)

    # ------------------------------------------------------------ 4. process faults

    def _process(self, tmp: Path) -> None:
        out = tmp / "runs"
        argv = ["run", *small_overrides(self.setup, out), *FAULT_RUN]
        # the runs to interrupt start first, as child processes: their imports overlap the reference run
        killed = Interrupt(run_cli([*argv, "--run-id", "killed"], tmp), out / "killed", 2, signal.SIGKILL)
        stopped = Interrupt(
            run_cli([*argv, "--run-id", "interrupted"], tmp), out / "interrupted", 1, signal.SIGINT
        )
        ref = call_main([*argv, "--run-id", "reference"], limit_s=300)
        if ref.code != 0 or broken(ref):
            self.add("process", "reference", "reference_run", broken(ref) or "wrong", res_line(ref))
            killed.result(), stopped.result()
            return
        reference = _keyed(RunStore.open(out / "reference").records())
        assert len(reference) == PLANNED, f"the reference run recorded {len(reference)} cases, not {PLANNED}"
        check = lambda run: self._records(run, reference)  # noqa: E731
        resumed = self._kill_and_concurrent_resume(tmp, killed)
        self._sigint(stopped, check)
        self._disk_full_then_read_only(out, argv, check)
        self._read_only(tmp, out)
        if resumed is not None:
            self._first_resume_completes(resumed, killed.run_dir, check)

    def _records(self, run: Path, reference: dict) -> tuple[int, str]:
        """(records lost or duplicated, how the records differ from the reference run's, if they do)."""
        found = RunStore.open(run).records()
        keys, records = [r.key for r in found], without_timings(found)
        lost = len(set(reference) - set(keys)) + (len(keys) - len(set(keys)))
        differ = [k[-1] for k, r in zip(keys, records, strict=True) if k in reference and reference[k] != r]
        return lost, f"records differ from the uninterrupted run's: {differ}" if differ else ""

    def _kill_and_concurrent_resume(self, tmp: Path, killed: Interrupt) -> Child | None:
        """kill -9 mid-run, then two resumes at once: a child takes the lock, then this process tries.
        Returns the child (still running) for ``_first_resume_completes``."""
        at_kill, res = killed.result()
        if at_kill is None:
            self.add(
                "process",
                "kill -9",
                "kill_9_mid_run",
                "hang" if res.code is None else "wrong",
                f"the run ended before its 2nd record (exit {res.code}): {res.first_line()}",
            )
            return None
        mid = f"killed after {at_kill} of {PLANNED} records"
        if at_kill >= PLANNED:  # not a fault of mmke's, but the resume below then proves little
            mid += " (the kill landed after the last record: the resume had nothing left to do)"
        self.add("process", "kill -9", "kill_9_mid_run", broken(res) or "clear", mid)
        run = killed.run_dir
        holder = run_cli(["run", "--resume", str(run)], tmp)
        took = _wait_for(lambda: (run / ".lock").read_text().strip() == str(holder.pid), holder, 180)
        second = call_main(["run", "--resume", str(run)], limit_s=60) if took else None
        name = "second_resume_refused"
        if second is None:
            self.add("process", "concurrent resume", name, "wrong", "the first resume never took the lock")
        elif (
            broken(second)
            or one_line_error(second)
            or "is being written by another mmke process" not in second.err
        ):
            self.add("process", "concurrent resume", name, broken(second) or "wrong", res_line(second))
        else:
            self.add("process", "concurrent resume", name, "clear", second.first_line())
        return holder

    def _first_resume_completes(self, holder: Child, run: Path, check: Callable) -> None:
        first = finish(holder)
        lost, differ = check(run)
        verdict = broken(first) or ("clear" if first.code == 0 and not differ else "wrong")
        detail = differ or (res_line(first) if first.code else "resumed to completion")
        self.add("process", "concurrent resume", "first_resume_completes", verdict, detail, records_lost=lost)

    def _sigint(self, stopped: Interrupt, check: Callable) -> None:
        at, res = stopped.result()
        if at is None:
            self.add(
                "process",
                "SIGINT",
                "sigint_mid_run",
                "hang" if res.code is None else "wrong",
                f"the run ended before its 1st record (exit {res.code}): {res.first_line()}",
            )
            return
        ok = res.code == 130 and len(res.err_lines) == 1 and not broken(res)
        detail = f"after {at} record(s): exit {res.code}, stderr {res.err_lines[:3]!r}"
        self.add("process", "SIGINT", "sigint_mid_run", broken(res) or ("clear" if ok else "wrong"), detail)
        resumed = call_main(["run", "--resume", str(stopped.run_dir)], limit_s=300)
        lost, differ = check(stopped.run_dir)
        verdict = broken(resumed) or ("clear" if resumed.code == 0 and not differ else "wrong")
        self.add(
            "process",
            "SIGINT",
            "resume_after_sigint",
            verdict,
            differ or res_line(resumed),
            records_lost=lost,
        )

    def _disk_full_then_read_only(self, out: Path, argv: list[str], check: Callable) -> None:
        """One run: the disk fills after its first record, the folder turns read-only after its
        second; each stop is one line that keeps what was written, and the last resume completes."""
        run = out / "faults"
        steps = (
            ("disk full", "disk_full", errno.ENOSPC, 1),
            ("read-only", "read_only_mid_run", errno.EROFS, 2),
        )
        for category, name, err, kept in steps:

            def fail_after(
                store: RunStore, record: dict, err: int = err, kept: int = kept, append=RunStore.append
            ) -> None:
                if len(store.records()) >= kept:
                    raise OSError(err, os.strerror(err), str(store.cases_path))
                append(store, record)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(RunStore, "append", fail_after)
                given = ["run", "--resume", str(run)] if run.is_dir() else [*argv, "--run-id", "faults"]
                res = call_main(given, limit_s=300)
            have = len(RunStore.open(run).records()) if run.is_dir() else 0
            why = one_line_error(res) or (
                ""
                if f"{kept} case record(s) written so far are kept" in res.err
                else f"does not say the {kept} record(s) are kept"
            )
            self.add(
                "process",
                category,
                name,
                broken(res) or ("wrong" if why else "clear"),
                f"{why}: {res.first_line()}" if why else res.first_line(),
                records_lost=max(kept - have, 0),
            )
            if not run.is_dir():
                return
        resumed = call_main(["run", "--resume", str(run)], limit_s=300)
        lost, differ = check(run)
        verdict = broken(resumed) or ("clear" if resumed.code == 0 and not differ else "wrong")
        self.add(
            "process",
            "read-only",
            "resume_after_both",
            verdict,
            differ or res_line(resumed),
            records_lost=lost,
        )

    def _read_only(self, tmp: Path, out: Path) -> None:
        def read_only(path: Path, *a: object, **k: object) -> Any:
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        ro_out = tmp / "read-only-out"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "touch", read_only)
            res = call_main(["run", *small_overrides(self.setup, ro_out), *QUICK], limit_s=120)
        self._refusal("process", "read-only", "read_only_out_folder", res, ro_out)
        finished = out / "reference"
        write_text, write_bytes = Path.write_text, Path.write_bytes

        def guarded(original: Callable) -> Callable:
            def write(path: Path, *a: object, **k: object) -> Any:
                if path.resolve().is_relative_to(finished.resolve()):
                    read_only(path)
                return original(path, *a, **k)

            return write

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "write_text", guarded(write_text))
            mp.setattr(Path, "write_bytes", guarded(write_bytes))
            res = call_main(["report", str(finished)], limit_s=120)
        bad = broken(res)
        lines = res.err_lines
        one = res.code in (1, 2) and len(lines) == 1 and lines[0].startswith("mmke: error: ")
        self.add(
            "process",
            "read-only",
            "report_of_a_read_only_run",
            bad or ("clear" if one else "wrong"),
            res.first_line() if one else f"exit {res.code}: {lines[:3]!r}",
        )
        elsewhere = call_main(["report", str(finished), "--out", str(tmp / "report-elsewhere")], limit_s=120)
        done = elsewhere.code == 0 and (tmp / "report-elsewhere" / "report.html").is_file()
        self.add(
            "process",
            "read-only",
            "report_written_elsewhere",
            broken(elsewhere) or ("ok" if done else "wrong"),
            res_line(elsewhere),
        )


# ---------------------------------------------------------------- helpers


class ModelLoaded(BaseException):
    """Raised by the stubbed ``LVLM.load``: a bad setting got past every check."""


def _refuse_to_load(*args: object, **kwargs: object) -> None:
    raise ModelLoaded()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def res_line(res: Result) -> str:
    return f"exit {res.code}: {res.first_line()}"


def _bad_settings(tmp: Path, afile: Path, sentinel: Path) -> dict[str, list[str]]:
    """name -> what ``mmke run`` is given on top of good settings; each must be refused in one line."""
    configs = {
        "config_not_utf8": b"limit: 2\nmodel: caf\xe9\n",
        "config_python_object": f"limit: !!python/object/apply:os.system ['touch {sentinel}']\n".encode(),
        "config_python_name": b"limit: !!python/name:os.system\n",
        "config_is_a_list": b"- limit: 2\n- model: world\n",
        "config_is_a_string": b"just words\n",
        "config_deep_flow": b"limit: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
        "config_deep_block": "".join(f"{'  ' * i}k{i}:\n" for i in range(500)).encode(),
        "config_bad_yaml": b"limit: [1,\n",
        "config_unknown_key": b"limt: 2\n",
        "config_tab_indent": b"method_options:\n\tft_llm: {steps: 1}\n",
        "config_utf16": "limit: 2\n".encode("utf-16"),
        "config_nul": b"limit: 2\x00\n",
        "config_binary": bytes(range(256)),
    }
    for name, data in configs.items():
        (tmp / f"{name}.yaml").write_bytes(data)
    return {
        "unknown_key": ["nope=1"],
        "unknown_key_typo": ["limt=2"],
        "limit_negative": ["limit=-1"],
        "limit_zero": ["limit=0"],
        "limit_text": ["limit=abc"],
        "limit_float": ["limit=1.5"],
        "limit_list": ["limit=[1]"],
        "limit_huge": ["limit=1e400"],
        "batch_size_zero": ["batch_size=0"],
        "seed_text": ["seed=abc"],
        "generate_text": ["generate=maybe"],
        "methods_empty": ["methods=[]"],
        "methods_unknown": ["methods=[nope]"],
        "methods_mapping": ["methods={a: 1}"],
        "methods_nested_list": ["methods=[[ft_llm]]"],
        "protocol_unknown": ["protocol=x"],
        "protocol_is_a_scoring": ["protocol=vlkeb"],
        "scoring_unknown": ["scoring=x"],
        "dtype_float8": ["dtype=float8"],
        "dtype_list": ["dtype=[float32]"],
        **({} if _cuda_available() else {"device_cuda_without_cuda": ["device=cuda"]}),
        "device_tpu": ["device=tpu"],
        "device_cuda_99": ["device=cuda:99"],
        "device_empty": ["device="],
        "gaps_negative": ["gaps=[-1]"],  # 0 is CCKEB's gap: scored right after its own edit
        "gaps_text": ["gaps=[a]"],
        "checkpoints_negative": ["checkpoints=[-5]"],
        "edit_types_unknown": ["edit_types=[nope]"],
        "method_option_typo": ["method_options.ft_llm.stepz=1"],
        "method_option_bad_value": ["method_options.ft_llm.lr=abc"],
        "method_option_negative_steps": ["method_options.ft_llm.steps=-3"],
        "method_option_unknown_method": ["method_options.nope.x=1"],
        "method_options_not_a_mapping": ["method_options=3"],
        "benchmark_unknown": ["benchmark=nope"],
        "benchmark_missing_file": ["benchmark=native:/missing.jsonl"],
        "benchmark_is_a_directory": [f"benchmark=native:{tmp}"],
        "benchmark_option_unknown": ["benchmark_options.x=1"],
        "benchmark_options_not_a_mapping": ["benchmark_options=[1]"],
        "image_root_missing": ["image_root=/nonexistent"],
        "image_root_is_a_file": [f"image_root={afile}"],
        "out_is_a_file": [f"out={afile}"],
        "out_under_a_file": [f"out={afile}/runs"],
        "model_missing": ["model=/nonexistent"],
        "model_unknown_name": ["model=nope"],
        "model_is_a_file": [f"model={afile}"],
        "override_without_equals": ["limit"],
        "override_empty_key": ["=3"],
        "override_bad_yaml": ["limit=[1,"],
        "override_deep_yaml": ["limit=" + "[" * 50_000],
        "override_python_tag": [f"limit=!!python/object/apply:os.system ['touch {sentinel}']"],
        "workers_zero": ["--workers", "0"],
        "workers_negative": ["--workers", "-3"],
        "workers_not_a_number": ["--workers", "abc"],
        "executor_unknown": ["--executor", "nope"],
        "run_id_with_slash": ["--run-id", "a/b"],
        "run_id_dotdot": ["--run-id", ".."],
        "run_id_empty": ["--run-id", ""],
        **{name: ["--config", str(tmp / f"{name}.yaml")] for name in configs},
        "config_missing": ["--config", str(tmp / "missing.yaml")],
        "config_is_a_directory": ["--config", str(tmp)],
    }


def _settings_category(name: str) -> str:
    for prefix in ("config", "resume", "model", "out", "workers", "executor", "run_id", "override", "device"):
        if name.startswith(prefix):
            return {"workers": "flags", "executor": "flags", "run_id": "flags"}.get(prefix, prefix)
    return "settings"


def _leftovers(out: Path | None) -> int:
    """What a refused command left under ``out`` (a folder, or a file that must be unchanged)."""
    if out is None or not out.exists() or out.is_file():
        return 0
    return sum(1 for _ in out.iterdir())


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (none if it is not a folder), but the lock a refused writer may create."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _changed(folder: Path, before: dict[str, bytes]) -> int:
    """Files a refused ``--resume`` added, changed or removed in ``folder`` (``before``: its snapshot)."""
    after = _snapshot(folder)
    return sum(1 for k in set(before) | set(after) if before.get(k) != after.get(k))


def _resume_folders(root: Path, setup: tuple[Path, Path]) -> dict[str, Path]:
    """Folders ``--resume`` must refuse in one line, each left exactly as it was."""
    from mmke.config import load_config
    from mmke.eval.store import config_hash

    root.mkdir(parents=True)
    made: dict[str, Path] = {}

    def folder(name: str, files: dict[str, str | bytes]) -> None:
        path = root / name
        path.mkdir()
        for fname, data in files.items():
            (path / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        made[name] = path

    good = load_config(None, [*small_overrides(setup, root / "runs"), *QUICK]).to_dict()
    store = RunStore.create(root / "runs", "valid", good)
    valid = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    folder("not_a_run", {"notes.txt": "hello"})
    folder("bad_yaml", {"config.yaml": "limit: [1,\n"})
    folder("config_is_a_list", {"config.yaml": "- 1\n- 2\n"})
    folder("config_not_utf8", {"config.yaml": b"limit: caf\xe9\n"})
    folder("config_python_tag", {"config.yaml": "limit: !!python/name:os.system\n"})
    folder("config_edited", {**valid, "config.yaml": valid["config.yaml"] + b"# edited\nlimit: 3\n"})
    unknown = {"nope": 1, **good}
    folder("config_unknown_key", {"config.yaml": json.dumps(unknown), "config_hash": config_hash(unknown)})
    bad_value = {**good, "limit": "abc"}
    folder("config_bad_value", {"config.yaml": json.dumps(bad_value), "config_hash": config_hash(bad_value)})
    folder("cases_not_json", {**valid, "cases.jsonl": b'{"case_id": "a"}\nnot json\n{"case_id": "b"}\n'})
    folder("cases_not_utf8", {**valid, "cases.jsonl": b'{"case_id": "caf\xe9"}\n'})
    folder("hash_not_utf8", {**valid, "config_hash": b"\xff\xfe\n"})
    made["missing"] = root / "missing"
    (root / "a-file").write_text("x")
    made["a_file"] = root / "a-file"
    return made


def _model_spoilers() -> list[tuple[str, Callable[[Path], Path | None], str]]:
    """(name, spoil(folder) -> the model= path or None for the folder, expect)."""
    import torch
    from safetensors.torch import load_file

    def write(name: str, data: str | bytes) -> Callable[[Path], None]:
        return lambda f: (f / name).write_bytes(data if isinstance(data, bytes) else data.encode()) and None

    def unlink(*names: str) -> Callable[[Path], None]:
        return lambda f: [(f / n).unlink() for n in names] and None

    def config(change: Callable[[dict], Any]) -> Callable[[Path], None]:
        def spoil(f: Path) -> None:
            cfg = json.loads((f / "config.json").read_text())
            (f / "config.json").write_text(json.dumps(change(cfg) or cfg))

        return spoil

    def weights(change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
        return lambda f: (
            (f / "model.safetensors").write_bytes(change((f / "model.safetensors").read_bytes())) and None
        )

    def lying_header(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text + data[8 + n :]

    def huge_header(data: bytes) -> bytes:
        return (2**62).to_bytes(8, "little") + data[8:]

    def to_pickle(f: Path) -> None:
        torch.save(load_file(f / "model.safetensors"), f / "pytorch_model.bin")
        (f / "model.safetensors").unlink()

    def as_dir(f: Path) -> None:
        (f / "model.safetensors").unlink()
        (f / "model.safetensors").mkdir()

    def emptied(f: Path) -> None:
        for p in f.iterdir():
            p.unlink()

    def a_file(f: Path) -> Path:
        (f.parent / f"{f.name}.txt").write_text("not a folder")
        return f.parent / f"{f.name}.txt"

    def vocab(cfg: dict) -> None:
        cfg["text_config"]["vocab_size"] += 7

    return [
        ("config_missing", unlink("config.json"), "bad"),
        ("config_not_json", write("config.json", "{not json"), "bad"),
        ("config_not_utf8", write("config.json", b'{"model_type": "caf\xe9"}'), "bad"),
        ("config_is_a_list", write("config.json", "[1, 2]"), "bad"),
        ("config_empty_object", write("config.json", "{}"), "bad"),
        ("config_empty_file", write("config.json", ""), "bad"),
        ("config_deep", write("config.json", "[" * 100_000 + "]" * 100_000), "bad"),
        (
            "config_unknown_architecture",
            config(lambda c: {**c, "model_type": "nope", "architectures": ["Nope"]}),
            "bad",
        ),
        ("config_text_config_wrong_type", config(lambda c: {**c, "text_config": "llama"}), "bad"),
        ("config_vocab_disagrees_with_weights", config(vocab), "bad"),
        ("weights_missing", unlink("model.safetensors"), "bad"),
        ("weights_zero_bytes", write("model.safetensors", b""), "bad"),
        ("weights_truncated", weights(lambda d: d[:-100]), "bad"),
        ("weights_cut_in_header", weights(lambda d: d[:40]), "bad"),
        ("weights_garbage", write("model.safetensors", os.urandom(4096)), "bad"),
        ("weights_header_lies_about_sizes", weights(lying_header), "bad"),
        ("weights_header_length_huge", weights(huge_header), "bad"),
        (
            "weights_lfs_pointer",
            write("model.safetensors", "version https://git-lfs.github.com/spec/v1\n"),
            "bad",
        ),
        ("weights_is_a_directory", as_dir, "bad"),
        ("weights_pickle", to_pickle, "bad"),
        ("weights_pickle_allowed", to_pickle, "ok"),
        ("tokenizer_missing", unlink("tokenizer.json", "tokenizer_config.json"), "bad"),
        ("tokenizer_not_json", write("tokenizer.json", "{not json"), "bad"),
        ("tokenizer_config_not_json", write("tokenizer_config.json", "{not json"), "bad"),
        ("processor_config_not_json", write("processor_config.json", "{not json"), "bad"),
        ("folder_empty", emptied, "bad"),
        ("model_is_a_file", a_file, "bad"),
    ]


def _signal_when(child: Child, run: Path, records: int, sig: int, timeout: float = 180) -> int | None:
    """Send ``sig`` once ``run``'s cases.jsonl holds ``records`` lines; how many it held (None: never)."""
    cases = run / "cases.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running():
        try:
            n = cases.read_bytes().count(b"\n")
        except OSError:
            n = 0
        if n >= records:
            child.proc.send_signal(sig)
            return n
        time.sleep(0.01)
    return None


class Interrupt(threading.Thread):
    """Sends ``sig`` to a child from ``run_cli`` once its run holds ``records`` records (in the
    background, so the test can run something else meanwhile); ``result()`` waits for the child."""

    def __init__(self, child: Child, run_dir: Path, records: int, sig: int) -> None:
        super().__init__(daemon=True)
        self.child, self.run_dir, self.records, self.sig = child, run_dir, records, sig
        self.at: int | None = None
        self.start()

    def run(self) -> None:
        self.at = _signal_when(self.child, self.run_dir, self.records, self.sig)

    def result(self) -> tuple[int | None, Result]:
        """(records when the signal went, or None if it never did; the child's result)."""
        res = finish(self.child)
        self.join()
        return self.at, res


def _wait_for(cond: Callable[[], bool], child: Child, timeout: float) -> bool:
    """Whether ``cond()`` came true while ``child`` ran (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running():
        try:
            if cond():
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, setup: tuple[Path, Path]) -> Suite:
    return Suite(tmp_path_factory, setup)


def _assert_none(failures: Sequence[str], what: str) -> None:
    assert not failures, f"{len(failures)} {what} failed:\n" + "\n".join(failures)


def test_every_reader_refuses_hostile_files_in_one_line_each(suite: Suite) -> None:
    _assert_none(suite.run("readers"), "hostile reader inputs")


def test_bad_settings_are_one_line_and_create_nothing(suite: Suite) -> None:
    _assert_none(suite.run("settings"), "bad settings")


def test_bad_model_folders_are_one_line_and_leave_no_run_folder(suite: Suite) -> None:
    _assert_none(suite.run("model_folders"), "bad model folders")


def test_kills_signals_concurrent_resumes_full_disks_and_read_only_folders_lose_nothing(suite: Suite) -> None:
    _assert_none(suite.run("process"), "process faults")


def test_the_counts_show_no_traceback_hang_or_loss(suite: Suite, tmp_path: Path) -> None:
    for section in Suite.SECTIONS:
        suite.run(section)
    report = {**suite.tally.report(), "seconds": suite.seconds}
    path = Path(os.environ.get("MMKE_HOSTILE_REPORT") or tmp_path / "hostile_report.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nhostile inputs (issue 19), report at {path}:\n{table(report)}")
    for line in report["failures"]:
        print("  FAILED", line)
    totals = report["totals"]
    assert set(report["sections"]) == set(Suite.SECTIONS)
    assert totals["inputs"] > 500, totals
    problems = {
        k: totals[k] for k in ("traceback", "hang", "wrong", "records_lost", "leftovers") if totals[k]
    }
    _assert_none(report["failures"], f"inputs ({problems})")
    assert not [describe(o) for o in suite.tally.outcomes if o.failed]
