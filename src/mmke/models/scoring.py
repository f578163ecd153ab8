"""Paper protocols: how teacher-forced passes become per-item scores, and how locality compares them.

A ``Scorer`` is one protocol's whole scoring convention (the config's ``scoring=``): the prompt
format per model family, which tokens are the target (for scoring and for training the edit
alike: a model encodes with the scorer bound to it), what each score keeps, how a locality probe
compares the edited model with the unedited one. ``mmke`` is
mmke's canonical definition; ``vlkeb``, ``mmke_bench`` and ``easyedit`` follow those projects'
code (reference: anchors_spec.md; each class names the functions it follows). A protocol's
known bugs that shape published numbers are offered as named ``emulations``, off by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import ClassVar, Protocol, overload

import torch

from mmke.models.batch import IGNORE, Batch
from mmke.models.families._base import OWN_FORMAT, PromptFormat
from mmke.registry import register_scorer


@dataclass(frozen=True)
class ItemScore:
    """One item's answer span, scored. Id tensors are on the CPU, one row per target token."""

    target_ids: torch.Tensor  # (n,) label ids: in context ("mmke"), tokenised alone ("vlkeb")
    argmax_ids: torch.Tensor  # (n,) the model's top-1 at each answer position
    topk_ids: torch.Tensor  # (n, k) top-k ids, best first
    token_accuracy: float  # mean over target tokens of argmax == label
    exact_match: bool  # every target token right
    nll: float  # mean over target tokens of -log p(label)
    #: (L, k) top-k ids at every logit position of the L-token item (image, prompt, answer); only
    #: for the paper protocols whose locality compares all positions (vlkeb, mmke_bench, easyedit).
    context_topk: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.target_ids.shape[0])


@dataclass(frozen=True)
class ScoredBatch(Sequence[ItemScore]):
    """Scores of a list of items, in the order they were given."""

    items: tuple[ItemScore, ...]

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, i: int) -> ItemScore: ...
    @overload
    def __getitem__(self, i: slice) -> ScoredBatch: ...
    def __getitem__(self, i: int | slice) -> ItemScore | ScoredBatch:
        if isinstance(i, slice):
            return ScoredBatch(self.items[i])
        return self.items[i]

    def __iter__(self) -> Iterator[ItemScore]:
        return iter(self.items)

    @property
    def token_accuracy(self) -> list[float]:
        return [s.token_accuracy for s in self.items]

    @property
    def exact_match(self) -> list[bool]:
        return [s.exact_match for s in self.items]

    @property
    def nll(self) -> list[float]:
        return [s.nll for s in self.items]


def score_answers(
    logits: torch.Tensor, labels: torch.Tensor, lengths: list[int], topk: int = 10
) -> list[ItemScore]:
    """Score answer-span logits (N, V) against labels (N,), items of ``lengths`` tokens each, in order."""
    k = min(topk, logits.shape[-1])
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)  # (N,)
    argmax = logits.argmax(dim=-1)  # (N,)
    top = logits.topk(k, dim=-1).indices  # (N, k)
    hit = (argmax == labels).float()  # (N,)
    item = torch.repeat_interleave(
        torch.arange(len(lengths), device=labels.device), torch.tensor(lengths, device=labels.device)
    )  # (N,)
    n = torch.tensor(lengths, dtype=torch.float32, device=labels.device)  # (B,)
    acc = torch.zeros_like(n).index_add_(0, item, hit) / n  # (B,)
    mean_nll = torch.zeros_like(n).index_add_(0, item, nll) / n  # (B,)
    return _items(labels.cpu(), argmax.cpu(), top.cpu(), acc.tolist(), mean_nll.tolist(), lengths)


def score_sequences(
    logits: torch.Tensor, labels: torch.Tensor, lengths: list[int], topk: int = 10
) -> list[ItemScore]:
    """Score full logits (B, T, V) against labels (B, T), keeping all-position top-k ids per item.

    The labelled positions are scored as ``score_answers`` does (the logit before each label);
    ``context_topk`` is the top-k at all ``lengths[b]`` positions of item b (every logit of its
    non-pad tokens, the last one included, as the anchors' trainer compares them).
    """
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)  # (N,), (N,), item-major
    counts = torch.bincount(rows, minlength=labels.shape[0]).tolist()  # (B,)
    scores = score_answers(logits[rows, cols - 1], labels[rows, cols], counts, topk)
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.cpu()  # (B, T, k)
    pairs = zip(scores, lengths, strict=True)
    return [replace(s, context_topk=top[b, :n]) for b, (s, n) in enumerate(pairs)]


def _items(
    labels: torch.Tensor,
    argmax: torch.Tensor,
    top: torch.Tensor,
    acc: list[float],
    nll: list[float],
    lengths: list[int],
) -> list[ItemScore]:
    parts = zip(labels.split(lengths), argmax.split(lengths), top.split(lengths), acc, nll, strict=True)
    return [ItemScore(t, a, k, ac, ac == 1.0, nl) for t, a, k, ac, nl in parts]


# --- locality comparisons ----------------------------------------------------------------------


def agreement(pre_argmax: torch.Tensor, post_argmax: torch.Tensor) -> float:
    """mmke locality: fraction of answer positions whose post-edit top-1 id equals the pre-edit one."""
    if tuple(pre_argmax.shape) != tuple(post_argmax.shape):
        raise ValueError(
            f"pre/post answer spans differ: {tuple(pre_argmax.shape)} vs {tuple(post_argmax.shape)}"
        )
    if pre_argmax.numel() == 0:
        raise ValueError("empty answer span: locality needs at least one answer token")
    return float((pre_argmax == post_argmax).float().mean().item())


def topk_rankwise(pre_topk: torch.Tensor, post_topk: torch.Tensor) -> float:
    """VLKEB/MMKE locality: element-wise (rank-order, not set) match of top-k ids, mean over positions x k."""
    # (n, k) each; the papers compare index lists position by position, so a swap of ranks 1 and 2 costs.
    return agreement(pre_topk, post_topk)


def trailing(pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last min(len(pre), len(post)) rows of each: sequences aligned at their ends."""
    n = min(pre.shape[0], post.shape[0])
    return pre[pre.shape[0] - n :], post[post.shape[0] - n :]


# --- paper protocols ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Emulation:
    """A known bug of an anchor that shapes its published numbers, re-enacted on request (``emulate=``)."""

    help: str
    methods: tuple[str, ...] = ()  # the methods it touches; empty: every method
    protocols: tuple[str, ...] = ()  # the editing protocols it exists under; empty: every one


class Forward(Protocol):
    """What a scorer needs of a model: its logits for an encoded batch."""

    def logits(self, batch: Batch, answer_only: bool = True) -> torch.Tensor: ...


class Scorer:
    """A paper protocol's scoring: the prompt format per family, which tokens are the target (for
    scoring and for training the edit alike: the model encodes with its bound scorer), what a
    score keeps, how locality compares the edited model with the unedited one.

    ``in_context`` in ``locality`` says the edit lives in the prompt (IKE): some anchors score that
    path differently from edits that change weights.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    #: The code whose definitions this scorer follows (repository@commit and its functions).
    follows: ClassVar[str] = ""
    #: How the protocol's code writes each family it supports (family name -> format).
    formats: ClassVar[Mapping[str, PromptFormat]] = MappingProxyType({})
    emulations: ClassVar[Mapping[str, Emulation]] = MappingProxyType({})
    #: The label rule for families the protocol has no format for (they keep their own prompts).
    target_alone: ClassVar[bool] = False

    def prompt_format(self, family: str) -> PromptFormat:
        """How this protocol writes and labels ``family``'s inputs."""
        own = replace(OWN_FORMAT, anchored=False, target_alone=self.target_alone)
        return self.formats.get(family, own)

    def score_batch(self, model: Forward, batch: Batch, topk: int) -> list[ItemScore]:
        """Scores of one encoded batch (items in batch order)."""
        logits = model.logits(batch)  # (N, V)
        return score_answers(logits, batch.answer_labels, batch.answer_lengths, topk)

    def locality(
        self, kind: str, post: ItemScore, pre: ItemScore, in_context: bool = False
    ) -> tuple[float, int]:
        """How far the edited model (``post``) still agrees with the unedited one (``pre``) on a
        locality probe of ``kind`` ("text_locality" / "image_locality"), 1.0 being untouched, and
        how many ids that compared (what a token-pooled average weighs it by)."""
        pre_ids, post_ids = self.compared(kind, post, pre, in_context)
        return agreement(pre_ids, post_ids), int(pre_ids.numel())

    def compared(
        self, kind: str, post: ItemScore, pre: ItemScore, in_context: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre- and post-edit ids this protocol's locality compares, element by element."""
        return pre.argmax_ids, post.argmax_ids

    def averaging(self, method: str) -> str:
        """How ``method``'s probe values become its table value: "macro" (each case's mean, then
        the mean over cases) or "micro" (every compared token of every case pooled)."""
        return "macro"

    def locality_rule(self, in_context: bool = False) -> str:
        return "top-1 agreement over the answer span"

    def comparable_group(self, family: str, emulate: Sequence[str] = ()) -> str:
        """Results with equal keys may share a table: same protocol and version, same emulations,
        and a format the protocol defines (a family it has none for is its own group)."""
        key = f"{self.name}/v{self.version}"
        if emulate:
            key += "+" + "+".join(sorted(emulate))
        if not self.prompt_format(family).anchored:
            key += f"/{family}-own-format"
        return key


def _full_topk(model: Forward, batch: Batch, topk: int) -> list[ItemScore]:
    lengths = batch.inputs["attention_mask"].sum(dim=1).tolist()  # non-pad tokens (padding is right)
    logits = model.logits(batch, answer_only=False)  # (B, T, V)
    if tuple(logits.shape[:2]) != tuple(batch.labels.shape):  # a model that re-lays out its tokens
        raise RuntimeError(
            f"logits {tuple(logits.shape)} do not line up with tokens {tuple(batch.labels.shape)}"
        )
    return score_sequences(logits, batch.labels, lengths, topk)


def _need_context(post: ItemScore, pre: ItemScore, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if pre.context_topk is None or post.context_topk is None:
        raise ValueError(
            f"{name} locality needs context_topk on the pre and post scores: score both with this scorer"
        )
    return pre.context_topk, post.context_topk


@register_scorer("mmke", help="mmke's own: targets in context, top-1 agreement over the answer span")
@dataclass(frozen=True)
class InContext(Scorer):
    """mmke's canonical scoring (DESIGN.md "Canonical definitions"): the target as tokenised in
    context; only the answer span is kept, so memory is O(answer tokens x vocab) per batch."""

    name: ClassVar[str] = "mmke"
    follows: ClassVar[str] = "DESIGN.md, Canonical definitions"

    def prompt_format(self, family: str) -> PromptFormat:
        return OWN_FORMAT


#: Text-locality k and image-locality k of the anchors' top-k comparison (the newer benchmarks'
#: locality kinds as their text or image counterpart: CCKEB's textual edit, ComprehendEdit's KPI).
PAPER_K: Mapping[str, int] = MappingProxyType(
    {"text_locality": 1, "image_locality": 10, "textual_edit_locality": 1, "in_domain_locality": 10}
)


class AllPositions(Scorer):
    """What the anchors' scorers share: labels are the target tokenised alone at the last
    positions, every position's top-k is kept, and locality is the rank-wise match of top-k ids
    (text k=1, image k=10) over the full sequences, aligned on their trailing min length."""

    target_alone: ClassVar[bool] = True

    def score_batch(self, model: Forward, batch: Batch, topk: int) -> list[ItemScore]:
        return _full_topk(model, batch, topk)

    def compared(
        self, kind: str, post: ItemScore, pre: ItemScore, in_context: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = PAPER_K[kind]
        pre_top, post_top = trailing(*_need_context(post, pre, self.name))  # (n, k) each
        return pre_top[:, :k], post_top[:, :k]


#: VLKEB main's inputs (VLKEB/VLKEB@10951b7 ``CaptionDataset.collate_fn`` builds "{prompt} {target}"
#: with no template for every model; each model wrapper then places the image).
VLKEB_FORMATS: Mapping[str, PromptFormat] = MappingProxyType(
    {
        # llava_llama.prepare_inputs_from_batch: BOS, the image's patch tokens, then the text
        "llava": PromptFormat(
            "[BOS][image]{prompt} {target} (no chat template)",
            template="{image}{prompt}",
            separator=" ",
            add_special_tokens=True,
            target_alone=True,
        ),
        # blip2_opt.Blip2OPT.forward: 32 query embeddings, then the OPT tokenizer's text with its BOS
        "blip2": PromptFormat(
            "[queries][BOS]{prompt} {target}",
            template="{prompt}",
            separator=" ",
            add_special_tokens=True,
            target_alone=True,
        ),
    }
)


@register_scorer(
    "vlkeb", help="VLKEB (main, multihop, edit_onehop branches): its inputs, labels and locality"
)
@dataclass(frozen=True)
class Vlkeb(AllPositions):
    """VLKEB's protocol, as its code computes it.

    Inputs as ``VLKEB_FORMATS``. Labels (for scoring and for training the edit, as ``FT.edit`` and
    ``MEND.edit`` use them) are the target tokenised alone, no leading space, at the last
    positions (``losses.multiclass_log_probs``: ``pred[:, :-1][:, -len(labels):]``); on byte-level
    BPE the first id is then the bare word, not the in-context " word". Locality, trainer path
    (``MultimodalTrainer.edit_step``): rank-wise top-k ids (text k=1, image k=10) at every logit
    position, the last included; IKE path (``compute_icl_multimodal_edit_quality``): the answer
    span only, pre without demonstrations. Macro averages (``RunningStatAverager``), except KE,
    whose code pools every compared token of every case (``pl.metrics.Accuracy``: micro).
    """

    name: ClassVar[str] = "vlkeb"
    version: ClassVar[int] = 2
    follows: ClassVar[str] = (
        "VLKEB/VLKEB main@10951b7 (and its multihop_and_sequential, edit_onehop branches)"
    )
    formats: ClassVar[Mapping[str, PromptFormat]] = VLKEB_FORMATS
    emulations: ClassVar[Mapping[str, Emulation]] = MappingProxyType(
        {
            "ft_stale_pre": Emulation(
                "FT's pre-edit locality comes from the model still holding the previous case's edit"
                " (VLKEB FT.edit restores only at the start of the next edit; edit_step scores pre first)",
                ("ft_llm", "ft_vision", "ft_projector"),
                ("single",),
            )
        }
    )

    def compared(
        self, kind: str, post: ItemScore, pre: ItemScore, in_context: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if in_context:  # icl_multimodal_loc_logits: the last len(answer) shifted positions
            k = PAPER_K[kind]
            return pre.topk_ids[:, :k], post.topk_ids[:, :k]
        # Equal lengths for every weight edit; a method that scores through another text (SERAC's
        # counterfactual model) is aligned on the shared tail, which ends at the same answer token.
        return super().compared(kind, post, pre)

    def locality_rule(self, in_context: bool = False) -> str:
        if in_context:
            return (
                "rank-wise top-k ids (text k=1, image k=10) over the answer span; pre without demonstrations"
            )
        return "rank-wise top-k ids (text k=1, image k=10) at every logit position"

    def averaging(self, method: str) -> str:
        return "micro" if method == "ke" else "macro"


@register_scorer("mmke_bench", help="MMKE-Bench (a VLKEB fork): VLKEB's inputs, labels and locality")
@dataclass(frozen=True)
class MmkeBench(Vlkeb):
    """MMKE-Bench's protocol: its scorer, FT, model wrappers and KE files are VLKEB's byte for byte
    (MMKE-Bench-ICLR/MMKE-Bench@d34455a), so every probe value is defined as under ``vlkeb``.

    Its own columns map onto mmke's metrics: ``T_Rel_average`` is T-Rel (``rel_1``/``rel_2``, no
    image), ``M_Rel_average`` I-Rel (``m_rel_*`` on the edit image), ``Gen_M_Rel_average`` I-Gen
    (``m_rel_*`` on ``image_rephrase``; for visual records ``image_rephrase_question``): per
    case the mean of _1 and _2, then over cases, as mmke's case means do. IKE there uses k=25.
    """

    name: ClassVar[str] = "mmke_bench"
    version: ClassVar[int] = 1
    follows: ClassVar[str] = (
        "MMKE-Bench-ICLR/MMKE-Bench@d34455a (MultimodalTrainer.edit_step; its VLKEB code)"
    )


#: EasyEdit HEAD's editor path (zjunlp/EasyEdit@14cea82 ``multimodal_evaluate.py``): BLIP-2 through
#: its LAVIS-style wrapper, HF VLMs (Qwen2/3-VL, LLaVA-OneVision) through the processor's template.
EASYEDIT_FORMATS: Mapping[str, PromptFormat] = MappingProxyType(
    {
        # prepare_multimodal_edit: prompt + " " + target; Blip2OPT.image_encoding tokenises without
        # special tokens (no BOS); labels: the model's own, prompt-masked, i.e. the tokens in context
        "blip2": PromptFormat(
            "[queries]{prompt} {target} (no BOS)",
            template="{prompt}",
            separator=" ",
            add_special_tokens=False,
        ),
        # prepare_multimodal_hf_edit: the chat template with its generation prompt, then the raw
        # target; vl_utils.build_target_labels writes the target tokenised alone into the last n
        "qwen2_vl": PromptFormat(
            "chat template + generation prompt, then the raw target", separator="", target_alone=True
        ),
    }
)


@register_scorer(
    "easyedit", help="EasyEdit HEAD's multimodal editor: its inputs, labels and trailing top-k locality"
)
@dataclass(frozen=True)
class EasyEdit(AllPositions):
    """EasyEdit HEAD's multimodal evaluation (``MultimodalEditor.edit``), as its code computes it.

    Inputs and labels as ``EASYEDIT_FORMATS`` (it has no LLaVA-1.5). Token accuracy is the mean
    over target tokens (its IKE configs for BLIP-2 set ``exact_match``: read mmke's exact-match
    table for those). Locality (``attach_topk_locality_metrics`` / ``vl_utils.topk_token_match``)
    compares top-k ids (text k=1, image k=10) over the full sequences aligned on their trailing
    min length, for weight edits and IKE alike (for IKE the pre sequence's image positions then
    meet text positions of the post one, as there). Macro averages (``print_result``).
    """

    name: ClassVar[str] = "easyedit"
    version: ClassVar[int] = 1
    follows: ClassVar[str] = (
        "zjunlp/EasyEdit@14cea82 (MultimodalEditor.edit, multimodal_evaluate.py, vl_utils.py)"
    )
    formats: ClassVar[Mapping[str, PromptFormat]] = EASYEDIT_FORMATS
    emulations: ClassVar[Mapping[str, Emulation]] = MappingProxyType(
        {
            "pre_after_edit": Emulation(
                '"pre" is scored after the edit for methods that change the model in place, so their'
                " locality is 1 (MultimodalEditor.edit's single-edit branch; EasyEdit issue 659)",
                ("mend", "lora", "grace", "wise"),
                ("single",),
            )
        }
    )

    def locality_rule(self, in_context: bool = False) -> str:
        return (
            "rank-wise top-k ids (text k=1, image k=10), full sequences aligned on their trailing min length"
        )


#: The default wherever no scorer is given.
CANONICAL: Scorer = InContext()


def scorer_named(name: str) -> Scorer:
    """The registered scorer ``name`` (the config's ``scoring=``)."""
    from mmke.registry import scorers

    return scorers.get(name)()
