"""Golden tests of the paper protocols (scoring=vlkeb / mmke_bench / easyedit) against the anchors' code.

Every expected value here is computed from the raw HF model and tokenizer, the way the named
anchor function does it, never through ``LVLM.score`` or a ``Scorer``:

* token accuracy, VLKEB/MMKE-Bench ``trainer/losses.py::multiclass_log_probs``: logits[:, :-1],
  then the last len(labels) positions, labels = tokenizer(target, add_special_tokens=False);
* token accuracy, EasyEdit ``multimodal_evaluate.py::compute_multimodal_edit_quality`` (BLIP-2:
  the model's own labels, prompt masked, shifted by one) and ``vl_utils.build_target_labels``
  (HF VLMs: the target alone in the last n positions);
* locality, VLKEB ``MultimodalTrainer.edit_step``: rank-wise top-k of every logit position;
  VLKEB ``evaluate.py::icl_multimodal_loc_logits``: the answer span only; EasyEdit
  ``vl_utils.topk_token_match``: full sequences aligned on their trailing min length.
"""

from __future__ import annotations

import pytest
import torch
from tests._runs import small_run

from mmke.errors import ConfigError
from mmke.eval import probe_result
from mmke.eval.records import CaseRecord
from mmke.eval.store import RunStore
from mmke.models import LVLM
from mmke.models.scoring import ItemScore, scorer_named
from mmke.models.tiny import tiny_model
from mmke.report import compare_runs
from mmke.report.tables import IncomparableError
from mmke.types import ImageRef, Probe, ProbeKind, Sample

QUESTION, TARGET = "what is the capital of france?", "paris and rome"
IMAGE = ImageRef("red.png")


def under(kind: str, scoring: str, store) -> LVLM:  # type: ignore[no-untyped-def]
    return tiny_model(kind).bind_images(store).bind_scorer(scorer_named(scoring))


def raw_logits(
    lvlm: LVLM, text: str, image: bool, add_special_tokens: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, V) logits and (T,) ids of one text through the HF processor and model directly."""
    proc = lvlm.processor
    if lvlm.family.name == "blip2":  # LAVIS-style: the query positions first, then the text ids
        ids = lvlm.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        if image:
            image_id = lvlm.tokenizer.convert_tokens_to_ids(str(proc.image_token))
            ids = [image_id] * proc.num_query_tokens + ids
        inputs = {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        }
        if image:
            inputs["pixel_values"] = proc.image_processor([lvlm.images.open(IMAGE)], return_tensors="pt")[
                "pixel_values"
            ]
            out = lvlm.model(**inputs)
        else:
            out = lvlm.model.language_model(**inputs)
    else:
        pictures = [lvlm.images.open(IMAGE)] if image else None
        inputs = proc(
            text=[text], images=pictures, add_special_tokens=add_special_tokens, return_tensors="pt"
        )
        out = lvlm.model(**inputs)
    with torch.no_grad():
        return out.logits[0].detach(), inputs["input_ids"][0]


def tail_accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    """multiclass_log_probs: pred[:, :-1], then its last len(labels) positions, vs labels."""
    pred = logits[:-1][-len(labels) :].argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


def rankwise(pre: torch.Tensor, post: torch.Tensor, k: int) -> float:
    """(post_topk.view(-1) == pre_topk.view(-1)).mean() over (positions, k)."""
    return float((post.topk(k, -1).indices == pre.topk(k, -1).indices).float().mean())


# ---------------------------------------------------------------- prompt formats


@pytest.mark.parametrize(
    ("kind", "scoring", "image", "text", "bos"),
    [
        ("llava", "vlkeb", True, f"<image>{QUESTION} {TARGET}", True),  # llava_llama: BOS, image, text
        ("llava", "vlkeb", False, f"{QUESTION} {TARGET}", True),
        ("llava", "mmke_bench", True, f"<image>{QUESTION} {TARGET}", True),
        ("blip2", "vlkeb", True, f"{QUESTION} {TARGET}", True),  # Blip2OPT.forward: queries, BOS, text
        ("blip2", "easyedit", True, f"{QUESTION} {TARGET}", False),  # image_encoding: no special tokens
        ("llava", "mmke", True, f"USER: <image>\n{QUESTION} ASSISTANT: {TARGET}", True),
    ],
)
def test_prompt_format_strings_per_family(
    store, kind: str, scoring: str, image: bool, text: str, bos: bool
) -> None:  # type: ignore[no-untyped-def]
    lvlm = under(kind, scoring, store)
    item = Sample(QUESTION, TARGET, IMAGE if image else None)
    assert lvlm.full_text(item) == text
    ids = lvlm.encode([item]).inputs["input_ids"][0].tolist()
    image_id = lvlm.tokenizer.convert_tokens_to_ids("<image>")
    text_ids = [i for i in ids if i != image_id]
    assert (text_ids[0] == lvlm.tokenizer.bos_token_id) is bos
    if kind == "llava" and image and scoring != "mmke":
        assert ids[0] == lvlm.tokenizer.bos_token_id and ids[1] == image_id  # the image right after BOS


def test_easyedit_hf_format_is_the_chat_template_then_the_raw_target(store) -> None:  # type: ignore[no-untyped-def]
    lvlm = under("qwen2_vl", "easyedit", store)
    item = Sample(QUESTION, TARGET, IMAGE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat = lvlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert lvlm.full_text(item) == chat + TARGET
    assert lvlm.prompt_format.anchored and lvlm.prompt_format.target_alone


def test_a_family_the_anchor_has_no_format_for_keeps_its_own_and_says_so(store) -> None:  # type: ignore[no-untyped-def]
    lvlm = under("qwen2_vl", "vlkeb", store)
    assert not lvlm.prompt_format.anchored and lvlm.prompt_format.target_alone
    assert scorer_named("vlkeb").comparable_group("qwen2_vl") == "vlkeb/v2/qwen2_vl-own-format"
    assert scorer_named("vlkeb").comparable_group("llava", ["ft_stale_pre"]) == "vlkeb/v2+ft_stale_pre"


# ---------------------------------------------------------------- token accuracy


@pytest.mark.parametrize(
    ("kind", "scoring"), [("llava", "vlkeb"), ("blip2", "vlkeb"), ("blip2", "mmke_bench")]
)
@pytest.mark.parametrize("image", [True, False])
def test_vlkeb_token_accuracy_is_multiclass_log_probs(store, kind: str, scoring: str, image: bool) -> None:  # type: ignore[no-untyped-def]
    lvlm = under(kind, scoring, store)
    item = Sample(QUESTION, TARGET, IMAGE if image else None)
    lead = "<image>" if kind == "llava" and image else ""
    logits, _ = raw_logits(lvlm, f"{lead}{QUESTION} {TARGET}", image, add_special_tokens=True)
    labels = lvlm.tokenizer(TARGET, add_special_tokens=False).input_ids
    (score,) = lvlm.score([item])
    assert score.target_ids.tolist() == labels
    assert score.token_accuracy == pytest.approx(tail_accuracy(logits, labels))
    # byte-level BPE: the bare first word is not the id the model sees in context (" paris")
    in_context = lvlm.tokenizer(f" {TARGET}", add_special_tokens=False).input_ids
    assert labels[0] != in_context[0]


def test_easyedit_blip2_token_accuracy_uses_its_own_prompt_masked_labels(store) -> None:  # type: ignore[no-untyped-def]
    lvlm = under("blip2", "easyedit", store)
    logits, ids = raw_logits(lvlm, f"{QUESTION} {TARGET}", True, add_special_tokens=False)
    tok = lvlm.tokenizer
    prompts_len = len(tok.encode(QUESTION, add_special_tokens=False))
    n_query = lvlm.processor.num_query_tokens
    targ = ids.clone()
    targ[: n_query + prompts_len] = -100
    pred, targ = logits[:-1].argmax(-1), targ[1:]  # the standard one-token shift
    mask = targ != -100
    expected = float((pred[mask] == targ[mask]).float().mean())
    (score,) = lvlm.score([Sample(QUESTION, TARGET, IMAGE)])
    assert score.target_ids.tolist() == targ[mask].tolist()
    assert score.token_accuracy == pytest.approx(expected)


def test_easyedit_hf_token_accuracy_uses_the_target_alone_in_the_last_positions(store) -> None:  # type: ignore[no-untyped-def]
    lvlm = under("qwen2_vl", "easyedit", store)
    item = Sample(QUESTION, TARGET, IMAGE)
    logits, _ = raw_logits(lvlm, lvlm.full_text(item), True, add_special_tokens=False)
    labels = lvlm.tokenizer(TARGET, add_special_tokens=False).input_ids
    (score,) = lvlm.score([item])
    assert score.token_accuracy == pytest.approx(tail_accuracy(logits, labels))


def test_the_world_model_under_vlkeb(store) -> None:  # type: ignore[no-untyped-def]
    lvlm = LVLM.load("world").bind_scorer(scorer_named("vlkeb"))
    assert lvlm.family.name == "llava"
    item = Sample("which country is this city in?", "the capital")
    assert lvlm.full_text(item) == "which country is this city in? the capital"
    logits, _ = raw_logits(lvlm, lvlm.full_text(item), False, add_special_tokens=True)
    labels = lvlm.tokenizer("the capital", add_special_tokens=False).input_ids
    (score,) = lvlm.score([item])
    assert score.token_accuracy == pytest.approx(tail_accuracy(logits, labels))


# ---------------------------------------------------------------- locality


def two_models(kind: str, scoring: str, store) -> tuple[LVLM, LVLM]:  # type: ignore[no-untyped-def]
    """The unedited model and an "edited" one: the same model with its lm head rows shuffled a little."""
    pre, post = under(kind, scoring, store), under(kind, scoring, store)
    with torch.no_grad():
        head = post.model.get_output_embeddings().weight
        head[:40] = head[:40].roll(1, dims=0)
    return pre, post


@pytest.mark.parametrize(
    ("kind", "scoring"), [("llava", "vlkeb"), ("blip2", "vlkeb"), ("llava", "mmke_bench")]
)
@pytest.mark.parametrize(("probe_kind", "k"), [(ProbeKind.TEXT_LOCALITY, 1), (ProbeKind.IMAGE_LOCALITY, 10)])
def test_trainer_path_locality_counts_every_position(store, kind, scoring, probe_kind, k) -> None:  # type: ignore[no-untyped-def]
    pre_m, post_m = two_models(kind, scoring, store)
    image = probe_kind == ProbeKind.IMAGE_LOCALITY
    probe = Probe(probe_kind, QUESTION, TARGET, IMAGE if image else None)
    text = pre_m.full_text(probe)
    pre_logits, _ = raw_logits(pre_m, text, image, add_special_tokens=True)
    post_logits, _ = raw_logits(post_m, text, image, add_special_tokens=True)
    expected = rankwise(pre_logits, post_logits, k)  # every position, the last included
    got = probe_result(probe, post_m.score([probe])[0], pre_m.score([probe])[0], pre_m.scorer)
    assert got.token_accuracy == pytest.approx(expected)
    assert 0.0 < expected < 1.0  # the perturbation shows, so the test can tell definitions apart


def ike_pair(kind: str, scoring: str, store, probe: Probe) -> tuple[ItemScore, ItemScore, str]:  # type: ignore[no-untyped-def]
    lvlm = under(kind, scoring, store)
    prefix = "New Fact: the sky is green\nPrompt: the sky is green\n\nNew Fact: the sky is green\nPrompt: "
    edited = Sample(prefix + probe.prompt, probe.target, probe.image)
    return lvlm.score([probe])[0], lvlm.score([edited])[0], lvlm.full_text(edited)


@pytest.mark.parametrize(("probe_kind", "k"), [(ProbeKind.TEXT_LOCALITY, 1), (ProbeKind.IMAGE_LOCALITY, 10)])
def test_vlkeb_ike_locality_is_the_answer_span_only(store, probe_kind, k) -> None:  # type: ignore[no-untyped-def]
    image = probe_kind == ProbeKind.IMAGE_LOCALITY
    probe = Probe(probe_kind, QUESTION, TARGET, IMAGE if image else None)
    pre, post, post_text = ike_pair("llava", "vlkeb", store, probe)
    lvlm = under("llava", "vlkeb", store)
    n = len(lvlm.tokenizer(TARGET, add_special_tokens=False).input_ids)
    pre_logits, _ = raw_logits(lvlm, lvlm.full_text(probe), image, add_special_tokens=True)
    post_logits, _ = raw_logits(lvlm, post_text, image, add_special_tokens=True)
    expected = rankwise(pre_logits[:-1][-n:], post_logits[:-1][-n:], k)
    got = probe_result(probe, post, pre, scorer_named("vlkeb"), in_context=True)
    assert got.token_accuracy == pytest.approx(expected)


@pytest.mark.parametrize("in_context", [False, True])
def test_easyedit_locality_aligns_full_sequences_on_their_tails(store, in_context: bool) -> None:  # type: ignore[no-untyped-def]
    probe = Probe(ProbeKind.IMAGE_LOCALITY, QUESTION, TARGET, IMAGE)
    pre, post, post_text = ike_pair("qwen2_vl", "easyedit", store, probe)
    lvlm = under("qwen2_vl", "easyedit", store)
    pre_logits, _ = raw_logits(lvlm, lvlm.full_text(probe), True, add_special_tokens=False)
    post_logits, _ = raw_logits(lvlm, post_text, True, add_special_tokens=False)
    expected = rankwise(pre_logits, post_logits[-pre_logits.shape[0] :], 10)
    got = probe_result(probe, post, pre, scorer_named("easyedit"), in_context=in_context)
    assert got.token_accuracy == pytest.approx(expected)


# ---------------------------------------------------------------- provenance, compare, emulations


def test_records_carry_provenance_and_compare_refuses_other_groups(setup, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from mmke.cli import main

    store_a, a = small_run(setup, tmp_path / "a", "methods=[noop,ike]", "method_options.ike.k=0", "limit=2")
    store_b, b = small_run(
        setup, tmp_path / "b", "methods=[noop,ike]", "method_options.ike.k=0", "limit=2", "scoring=vlkeb"
    )
    rec = {r.run.method: r for r in RunStore.open(store_b.path).records()}
    prov = rec["ike"].run.provenance
    assert prov is not None and prov.protocol == "vlkeb" and prov.comparable_group == "vlkeb/v2"
    assert "answer span" in prov.locality and "every logit position" in rec["noop"].run.provenance.locality
    assert prov.prompt_format.startswith("llava: [BOS][image]")
    assert {g.comparable_group for g in b.groups} == {"vlkeb/v2"}
    assert {g.comparable_group for g in a.groups} == {"mmke/v1"}
    with pytest.raises(IncomparableError, match=r"e\.g\. .* (noop|ike): A mmke/v1, B vlkeb/v2; pass --mixed"):
        compare_runs(store_a.path, store_b.path)
    assert "(≠) not comparable" in compare_runs(store_a.path, store_b.path, mixed=True)
    assert main(["compare", str(store_a.path), str(store_b.path)]) != 0
    assert "pass --mixed" in capsys.readouterr().err
    assert "(≠)" not in compare_runs(store_a.path, store_a.path)


def locality_by_case(store: RunStore, method: str) -> dict[str, tuple[float, float]]:
    return {
        r.case_id: (r.metrics["text_locality"], r.metrics["image_locality"])
        for r in store.records()
        if r.run.method == method
    }


def test_vlkeb_ft_stale_pre_takes_pre_from_the_previous_cases_edit(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ("methods=[ft_llm,ike]", "method_options.ike.k=0", "limit=4", "scoring=vlkeb")
    clean, _ = small_run(setup, tmp_path / "clean", *args)
    stale, _ = small_run(setup, tmp_path / "stale", *args, "emulate=[ft_stale_pre]")
    ids = [r.case_id for r in clean.records() if r.run.method == "ft_llm"]
    ours, theirs = locality_by_case(clean, "ft_llm"), locality_by_case(stale, "ft_llm")
    assert ours[ids[0]] == theirs[ids[0]]  # the first case has no previous edit
    assert any(ours[c] != theirs[c] for c in ids[1:])
    assert locality_by_case(clean, "ike") == locality_by_case(stale, "ike")  # FT only
    recs = {r.run.method: r.run.provenance for r in stale.records()}
    assert recs["ft_llm"].emulate == ("ft_stale_pre",) and recs["ike"].emulate == ()
    assert recs["ft_llm"].comparable_group == "vlkeb/v2+ft_stale_pre"


def test_easyedit_pre_after_edit_makes_in_place_methods_look_local(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ("methods=[lora,ike]", "method_options.ike.k=0", "limit=3", "scoring=easyedit")
    store, _ = small_run(setup, tmp_path / "r", *args, "emulate=[pre_after_edit]")
    records: list[CaseRecord] = store.records()
    for r in records:
        if r.run.method == "lora":
            assert r.metrics["text_locality"] == r.metrics["image_locality"] == 1.0
            assert r.base == r.metrics  # "pre" is the edited model
    assert any(r.metrics["text_locality"] < 1.0 for r in records if r.run.method == "ike")


def test_an_emulation_of_another_protocol_is_refused() -> None:
    from mmke.config import load_config

    with pytest.raises(ConfigError, match="scoring=mmke offers these emulations: none") as e:
        load_config(None, ["emulate=[ft_stale_pre]"])
    assert "\n" not in str(e.value)
    assert load_config(None, ["scoring=vlkeb", "emulate=[ft_stale_pre]"]).emulate == ("ft_stale_pre",)


def test_a_trained_editor_is_keyed_by_the_protocols_inputs(store) -> None:  # type: ignore[no-untyped-def]
    from mmke.methods.mend import MEND

    editor, lvlm = MEND(), under("llava", "mmke", store)
    own = editor.cache_path(lvlm)
    assert editor.trained_identity(lvlm) == editor.identity()
    lvlm.bind_scorer(scorer_named("vlkeb"))  # trained on VLKEB's texts and target-alone labels
    assert editor.cache_path(lvlm) != own and "prompt_format" in editor.trained_identity(lvlm)


def test_vlkeb_pools_kes_tokens_over_cases_as_its_lightning_accuracy_does(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    world, _ = setup
    store, summary = small_run(
        setup,
        tmp_path / "r",
        "methods=[ke,noop]",
        "limit=4",
        "scoring=vlkeb",
        "method_options.ke.train_steps=2",
        f"benchmark_options.train={world / 'cases_train.jsonl'}",
    )
    records = [r for r in store.records() if r.run.method == "ke" and r.ok]
    assert records and all(r.run.provenance.averaging == "micro" for r in records)
    for kind in ("reliability", "text_locality", "image_locality"):
        probes = [p for r in records for p in r.probes if p.kind == kind]
        assert all(p.n_tokens for p in probes)
        pooled = sum(p.token_accuracy * p.n_tokens for p in probes) / sum(p.n_tokens for p in probes)
        (group,) = [g for g in summary.groups if g.method == "ke" and g.edit_type == "all" and g.task is None]
        assert group.metrics[kind] == pytest.approx(pooled, abs=1e-6)
    (ke,) = [g for g in summary.groups if g.method == "ke" and g.edit_type == "all" and g.task is None]
    macro = {k: sum(r.metrics[k] for r in records) / len(records) for k in ("reliability", "image_locality")}
    assert any(ke.metrics[k] != pytest.approx(v, abs=1e-6) for k, v in macro.items())  # the two differ here
    (noop,) = [g for g in summary.groups if g.method == "noop" and g.edit_type == "all" and g.task is None]
    assert noop.provenance.averaging == "macro"


def test_an_emulation_outside_its_editing_protocol_is_refused() -> None:
    from mmke.config import load_config

    with pytest.raises(ConfigError, match="re-enacts a bug of single editing, not of protocol=lifelong"):
        load_config(None, ["scoring=vlkeb", "emulate=[ft_stale_pre]", "protocol=lifelong"])
