"""Batch editing: the protocol's schedule, ``apply_many`` per method, the refusal, a run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _runs import small_run
from mmke.config import RunConfig, load_config
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.eval.job import preflight
from mmke.eval.protocols import BatchEdit, protocol_named
from mmke.methods import IKE
from mmke.methods.base import BatchUnsupported
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from test_methods import TRAIN, KeywordEmbedder, assert_state, fruit_case, make_case, state
from test_methods import store as store  # the image fixture

Setup = tuple[Path, Path]


def test_batches_of_k_are_written_together_and_each_case_is_scored_through_them() -> None:
    cfg = RunConfig(methods=("ft_llm",), protocol="batch", batch_edits=4).validate()
    episodes = BatchEdit().episodes(cfg, 10)
    assert [s.edits for e in episodes for s in e.steps] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [[c.case for c in s.checks] for e in episodes for s in e.steps] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
    # every check goes through the one handle of the batch; the checkpoint is the batch's size
    assert {c.through for e in episodes for s in e.steps for c in s.checks} == {0}
    assert [s.checkpoint for e in episodes for s in e.steps] == [4, 4, 2]
    assert episodes[1].cases == [4, 5, 6, 7]
    assert protocol_named("batch").planned(cfg, 10) == 10


def test_batch_edits_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="batch_edits=0"):
        RunConfig(protocol="batch", batch_edits=0).validate()


CASES = [
    make_case("rome"),
    make_case("tokyo", prompt="what city is in japan?"),
    make_case("lisbon", image="blue.png", prompt="which city is in portugal?"),
]
#: settings that move a tiny random model, as in the method matrix (MEMIT: tests/test_memit.py)
SETTINGS: dict[str, dict[str, Any]] = {
    "ft_llm": {"lr": 1e-2, "steps": 20},
    "lora": {"lr": 5e-2, "steps": 20},
    "grace": {},
    "wise": {"steps": 50, "lr": 0.3},
}


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_one_update_writes_every_edit_and_restores_exactly(method: str, store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = methods.get(method)(SETTINGS[method])
    if editor.needs_train_cases:
        editor.train(model, CASES)
    before, pre = state(model), model.score([c.edit for c in CASES])
    torch.manual_seed(0)
    with editor.apply_many(model, CASES) as edited:
        post = edited.score([c.edit for c in CASES])
    assert [b.nll < a.nll - 0.1 for a, b in zip(pre, post, strict=True)] == [True] * 3, method
    assert_state(model, before)


@pytest.mark.parametrize("method", ["ft_llm", "grace", "wise"])
def test_a_batch_of_one_is_the_single_edit(method: str, store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = methods.get(method)(SETTINGS[method])
    if editor.needs_train_cases:
        editor.train(model, CASES)

    def edited_by(apply: Any) -> list[float]:
        torch.manual_seed(0)
        with apply() as edited:
            return [s.nll for s in edited.score(CASES[0].probes)]

    one = edited_by(lambda: editor.apply(model, CASES[0]))
    assert edited_by(lambda: editor.apply_many(model, CASES[:1])) == one


def test_ike_puts_every_fact_in_one_context_and_asks_each_prompt_about_its_nearest(
    tmp_path: Path, store: ImageStore
) -> None:
    editor = IKE({"k": 2, "cache_dir": str(tmp_path)}, embedder=KeywordEmbedder())
    editor.prepare(TRAIN)
    cases = [fruit_case("apple", "blue"), fruit_case("lemon", "pink")]
    edited = editor.apply_many(tiny_model("llava").bind_images(store), cases)
    asked = edited.view([cases[0].probes[1], cases[1].probes[1]])
    for view, fact in zip(asked, ("the apple is blue", "the lemon is pink"), strict=True):
        assert "New Fact: the apple is blue\nPrompt: the apple is blue" in view.prompt
        assert "New Fact: the lemon is pink\nPrompt: the lemon is pink" in view.prompt
        assert view.prompt.count("New Fact:") == 2 + 2 + 1  # k demonstrations, both facts, the question
        assert view.prompt.endswith(f"New Fact: {fact}\nPrompt: {view.prompt.rsplit('Prompt: ', 1)[1]}")
    # one case: exactly the single edit's context
    single = editor.apply(tiny_model("llava"), cases[0]).view(cases[0].probes[:1])
    assert editor.apply_many(tiny_model("llava"), cases[:1]).view(cases[0].probes[:1]) == single


def test_serac_writes_every_edit_into_its_memory_and_forgets_them_together(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = methods.get("serac")({"train_steps": 5})
    editor.train(model, CASES)
    with editor.apply_many(model, CASES) as edited:
        assert len(editor.memory(model)) == 3
        assert edited.details["memory_size"] == 3
    assert editor.memory(model) == []


@pytest.mark.parametrize("method", ["rome", "mend", "ke"])
def test_a_method_that_cannot_batch_says_so_instead_of_looping(method: str, store: ImageStore) -> None:
    editor = methods.get(method)()
    with pytest.raises(BatchUnsupported, match=rf"^{method} cannot write 3 edits in one update: "):
        editor.apply_many(tiny_model("llava").bind_images(store), CASES)


def test_the_run_refuses_non_batching_methods_in_one_line_before_loading(
    setup: Setup, tmp_path: Path
) -> None:
    cfg = load_config(None, [*cfg_overrides(setup), "protocol=batch", "methods=[ft_llm,rome,memit]"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    message = str(err.value)
    assert "\n" not in message and "rome" in message and "memit" not in message.split("(")[0]
    assert "memit" in message.split("methods that can: ")[1]
    # one edit per batch is no batching: every method runs
    preflight(load_config(None, [*cfg_overrides(setup), "protocol=batch", "batch_edits=1", "methods=[rome]"]))


def cfg_overrides(setup: Setup) -> list[str]:
    world, model_dir = setup
    return [f"benchmark=native:{world / 'cases_eval.jsonl'}", f"image_root={world}", f"model={model_dir}"]


def test_a_batch_run_scores_every_case_through_its_batch(setup: Setup, tmp_path: Path) -> None:
    store, summary = small_run(setup, tmp_path, "methods=[ft_llm,noop]", "protocol=batch", "batch_edits=4")
    records = store.records()
    assert len(records) == 2 * 6 and all(r.status == "ok" for r in records)
    assert {(r.run.protocol, r.run.checkpoint) for r in records} == {("batch", 4), ("batch", 2)}
    ft = [r for r in records if r.run.method == "ft_llm"]
    # the four cases of a batch share one edit: one cost, all of it
    assert len({r.efficiency["edit_seconds"] for r in ft[:4]}) == 1
    assert ft[0].efficiency["edited_params"] == ft[4].efficiency["edited_params"] > 0
    noop = next(g for g in summary.groups if g.method == "noop" and g.edit_type == "all" and g.task is None)
    assert noop.metrics["text_locality"] == 1.0
