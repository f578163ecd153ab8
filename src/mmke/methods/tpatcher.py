"""T-Patcher: a few trained neurons ("patches") added to the last FFN layer, one per mistake of an edit
(Huang et al. 2023, "Transformer-Patcher: One Mistake Worth One Neuron", ICLR 2023; code
ZeroYuHuang/Transformer-Patcher, and its vision-language port TP_VL in qizhou000/LiveEdit).

A patch neuron j has a key k_j and bias b_j read from the FFN's input x, and a value v_j added to the
FFN's output: FFN(x) + Σ_j act(x·k_j + b_j) v_j. The wrapper sits at ``layout.mlp(layer)`` (the last
decoder layer's MLP block by default, as the paper patches the last FFN layer) and reads the block's
input, the one its first projection reads. Layers with no MLP block (OPT, i.e. BLIP-2) resolve that
role to the output projection fc2: there the key reads fc2's input, the FFN's hidden activations.

One neuron per mistake: as in the paper's seq2seq setting, an edit gets one neuron for each answer
token the model predicts wrongly (teacher-forced; at most ``max_neurons``), keyed at the position
predicting that token. Its key starts as that position's input q / ‖q‖² and its bias at 0, so its
activation starts at 1 there (the paper's initialisation). Only the patch trains, with Adam on the
paper's loss L_e + alc·L_a + mlc·L_m:
- L_e: the edit's target NLL;
- L_a = mean_j exp(−a_j), a_j the pre-activation of neuron j at its own position (keep it firing);
- L_m = topk-mean exp(m − a + γ) + topk-mean exp(m − β) over memory pre-activations m: each memory
  input at least γ below the edit's activation and below β (paper: γ = 3, β = −3, top 1000).
The memory is a fixed pool, never the case's own locality probes (that would train on the test set,
EasyEdit#648): every token of ``memory`` train-split locality probes spread over the split (text,
and image ones the model can take), collected by ``train`` as WISE collects its irrelevant inputs
(the paper: 40,000 token states of training questions, the same for every edit), plus the key
inputs of every earlier edit at the site (the paper adds each edited example to the memory, so a
new patch does not fire on old edits).

Differences from the paper, and why:
- act is a hard-gated ReLU, not the FFN's own activation (GELU in BART; TP_VL adds SwiGLU neurons to
  gate and up): a neuron adds nothing unless x·k + b > 0, so every position where no patch fires gets
  the wrapped module's output bit-identically. The paper's losses already treat pre-activation ≤ 0
  as inactive (their margins sit at 0 and −3).
- The value starts at zero (as in TP_VL), not at 10 × a random vector (the original's amplified
  value): the first step then sees the unedited model and no random vector is written into the
  residual stream. The original's amplifier (v = a ⊙ u, a initialised to 10) is kept as its effect
  under Adam: the value trains at ``amplify`` × ``lr``.
- Training stops at the first step where the edit is right (teacher-forced argmax on every answer
  token) and both memory margins hold, at most ``steps`` steps; the original validates by beam search
  every 25 steps after step 100 and continues while the memory loss improves (at most 2000 steps).
  No weight decay (original 0.01; TP_VL 0) and no LR-on-plateau scheduler; the gradient is clipped
  to norm 5 as in the original's trainer.
- L_a averages over all the edit's neurons (the original: top 5, the same for ≤ 5 neurons).

Lifelong: a second edit on a patched model adds neurons to the same wrapper; each handle's restore
removes its own neurons (newest first) and the last one puts the original module back. Batch editing
(``apply_many``): each case gets its own neurons, all trained in one optimisation on the sum of the
losses (the edit loss is the mean over cases); a case the model already answers gets none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmke.errors import ConfigError
from mmke.methods._irrelevant import locality_pool, usable_pool
from mmke.methods.base import (
    EditCollapsed,
    Edited,
    Editor,
    finite_loss,
    frozen_prefix_replayed,
    layer_io,
    swap_module,
    trainable_only,
    wrapper_at,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase, Sample


@dataclass(frozen=True)
class TPatcherConfig:
    """T-Patcher settings (the original's names in brackets).

    ``max_neurons`` [max_add_neuron_num] caps the neurons of one edit; ``steps`` [max_edit_step]
    caps training; ``lr`` trains keys and biases, ``amplify`` × ``lr`` the values [amplify_con];
    ``act_weight`` [alc] and ``memory_weight`` [mlc, 10 for zsRE] weigh L_a and L_m; ``margin``
    [margin_val1] is γ and ``memory_ceiling`` [margin_val2] is β; ``memory`` is how many
    train-split locality probes form the memory and ``top_k`` how many of the largest memory terms
    L_m averages; ``clip`` bounds the gradient norm.
    """

    layer: int = -1
    max_neurons: int = 5
    steps: int = 200
    lr: float = 1e-2
    amplify: float = 10.0
    act_weight: float = 1.0
    memory_weight: float = 10.0
    margin: float = 3.0
    memory_ceiling: float = -3.0
    memory: int = 128
    top_k: int = 1000
    clip: float = 5.0
    early_stop: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.max_neurons >= 1, f"max_neurons must be >= 1, got {self.max_neurons}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.amplify > 0, f"amplify must be > 0, got {self.amplify}"),
            (self.act_weight >= 0, f"act_weight must be >= 0, got {self.act_weight}"),
            (self.memory_weight >= 0, f"memory_weight must be >= 0, got {self.memory_weight}"),
            (self.margin >= 0, f"margin must be >= 0, got {self.margin}"),
            (self.memory_ceiling <= 0, f"memory_ceiling must be <= 0, got {self.memory_ceiling}"),
            (self.memory >= 1, f"memory must be >= 1, got {self.memory}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.clip > 0, f"clip must be > 0, got {self.clip}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"tpatcher {message}")


@dataclass(frozen=True, eq=False)
class Patch:
    """One edit's neurons, float32: keys (n, I), biases (n,), values (n, D), and the inputs they
    were keyed on (n, I), which later edits keep their own neurons from firing on."""

    keys: torch.Tensor
    biases: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def floats(self) -> int:
        return self.keys.numel() + self.biases.numel() + self.values.numel()

    def rows(self, index: torch.Tensor) -> Patch:
        """The neurons at ``index`` (a detached copy)."""
        return Patch(*(t[index].detach() for t in (self.keys, self.biases, self.values, self.queries)))


class PatchedFFN(nn.Module):
    """Wraps an FFN site: its output, plus Σ relu(x·k + b) v at the positions where a neuron fires.

    Patches are plain tensors, not parameters, so the wrapped module's parameters are the wrapper's
    only ones. ``live`` is the patch being trained during an edit; ``patches`` are committed ones.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.live: Patch | None = None
        self.edits: list[TPatcherEdited] = []  # live handles, oldest first
        self._patches: tuple[Patch, ...] = ()
        self._stack: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def patches(self) -> tuple[Patch, ...]:
        return self._patches

    @patches.setter
    def patches(self, value: Sequence[Patch]) -> None:
        self._patches = tuple(value)
        # one concatenation per change, not per forward: a lifelong run holds thousands of neurons
        self._stack = _concat(self._patches) if self._patches else None

    @property
    def neurons(self) -> int:
        return sum(len(p) for p in self._patches)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(x, *args, **kwargs)  # (..., D)
        stack = self._neurons()
        if stack is None:
            return out
        keys, biases, values = stack  # (n, I), (n,), (n, D)
        pre = x.float() @ keys.T + biases  # (..., n)
        hit = (pre > 0).any(dim=-1)  # (...)
        if not bool(hit.any()):
            return out
        delta = F.relu(pre) @ values  # (..., D)
        return torch.where(hit[..., None], out + delta.to(out.dtype), out)

    def _neurons(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.live is None:
            return self._stack
        live = (self.live.keys, self.live.biases, self.live.values)
        if self._stack is None:
            return live
        return tuple(torch.cat([a, b]) for a, b in zip(self._stack, live, strict=True))  # type: ignore[return-value]


def _concat(patches: Sequence[Patch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.cat([p.keys for p in patches]),
        torch.cat([p.biases for p in patches]),
        torch.cat([p.values for p in patches]),
    )


class TPatcherEdited(Edited):
    """A T-Patcher edit: restore removes its neurons (and puts the original module back when it was
    the last edit at this site). Live edits at one site restore in reverse order.
    """

    def __init__(
        self,
        model: LVLM,
        site: str,
        patcher: PatchedFFN,
        added: Sequence[Patch],
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, details)
        self.site = site
        self.patcher = patcher
        self.added = tuple(added)
        patcher.patches = [*patcher.patches, *self.added]
        patcher.edits.append(self)

    @property
    def edited_params(self) -> int:
        """Floats this edit added: its neurons' keys, biases and values."""
        return sum(p.floats for p in self.added)

    def _release(self) -> None:
        if self.patcher.edits[-1] is not self:
            raise RuntimeError(f"tpatcher: restore the later edits at {self.site} first (reverse order)")
        self.patcher.edits.pop()
        kept = len(self.patcher.patches) - len(self.added)
        self.patcher.patches = self.patcher.patches[:kept]
        if not self.patcher.edits:
            swap_module(self.model.model, self.site, self.patcher.inner)


@register_method("tpatcher")
class TPatcher(Editor[TPatcherConfig]):
    """T-Patcher: trained neurons in the last FFN, one per mistake; lifelong edits add neurons."""

    name = "tpatcher"
    defaults = TPatcherConfig()
    batches = True

    def __init__(self, config: TPatcherConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.memory_pool: tuple[Sample, ...] | None = None  # set by train

    @property
    def needs_train_cases(self) -> bool:
        return True

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Keep the train split's locality probes (text, and image ones the model can take) as memory."""
        self.memory_pool = locality_pool(model, train_cases)

    def apply(self, model: LVLM, case: EditCase) -> TPatcherEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> TPatcherEdited:
        memory = self._memory_samples(model)
        site = model.layout.mlp(self.config.layer)
        patcher = wrapper_at(model, site, PatchedFFN)
        try:
            added, details = self._patch(model, patcher, site, list(cases), memory)
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            if not patcher.edits:
                swap_module(model.model, site, patcher.inner)
            raise
        return TPatcherEdited(model, site, patcher, added, details)

    def _memory_samples(self, model: LVLM) -> list[Sample]:
        pool = usable_pool(model, self.memory_pool, self.name, "T-Patcher's memory is made of them")
        stride = max(1, len(pool) // self.config.memory)  # a fixed memory (as in the paper) spread
        return pool[::stride][: self.config.memory]  # over the whole train split

    def _patch(
        self, model: LVLM, patcher: PatchedFFN, site: str, cases: list[EditCase], samples: list[Sample]
    ) -> tuple[list[Patch], dict[str, Any]]:
        """Add and train one neuron per mistake of each case; returns the cases' patches and details."""
        batch = model.encode([c.edit for c in cases])
        queries, owners, width = _mistakes(model, patcher, batch, self.config.max_neurons)
        counts = [int((owners == b).sum()) for b in range(len(cases))]
        if not counts or not sum(counts):  # nothing is wrong: T-Patcher adds no neuron
            return [], {"losses": [], "steps": 0, "neurons": counts, "stopped_early": True}
        memory = torch.cat([_token_inputs(model, patcher, samples), *(p.queries for p in patcher.patches)])
        live = Patch(
            (queries / queries.pow(2).sum(-1, keepdim=True)).requires_grad_(True),  # activation 1 at q
            torch.zeros(len(queries), device=queries.device, requires_grad=True),
            torch.zeros(len(queries), width, device=queries.device, requires_grad=True),
            queries,
        )
        losses, stopped = self._train(model, patcher, site, batch, live, memory)
        details = {
            "losses": losses,
            "steps": len(losses),
            "neurons": counts,
            "stopped_early": stopped,
            **_activations(live, memory),
        }
        return [live.rows((owners == b).nonzero().squeeze(1)) for b in range(len(cases))], details

    def _train(
        self, model: LVLM, patcher: PatchedFFN, site: str, batch: Batch, live: Patch, memory: torch.Tensor
    ) -> tuple[list[float], bool]:
        """Adam on the patch until the edit is right and the memory margins hold (or ``steps`` steps)."""
        cfg = self.config
        opt = torch.optim.Adam(
            [
                {"params": [live.keys, live.biases], "lr": cfg.lr},
                {"params": [live.values], "lr": cfg.lr * cfg.amplify},
            ]
        )
        losses: list[float] = []
        patcher.live = live
        try:
            replay = frozen_prefix_replayed(model, model.layout.params(site))
            with trainable_only(model.model, {}), replay, torch.enable_grad():
                for step in range(cfg.steps):
                    logits = model.logits(batch)  # (N, V)
                    act = (live.queries * live.keys).sum(-1) + live.biases  # (n,): each at its position
                    mem = memory @ live.keys.T + live.biases  # (M, n)
                    loss = _edit_nll(batch, logits) + self._patch_loss(act, mem)
                    losses.append(finite_loss(float(loss.detach()), step, self.name))
                    if cfg.early_stop and self._done(batch, logits, act, mem):
                        return losses, True
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([live.keys, live.biases, live.values], cfg.clip)
                    opt.step()
        finally:
            patcher.live = None
        if not all(bool(torch.isfinite(t).all()) for t in (live.keys, live.biases, live.values)):
            raise EditCollapsed(f"tpatcher: patch became non-finite at step {cfg.steps}", cfg.steps)
        return losses, False

    def _done(self, batch: Batch, logits: torch.Tensor, act: torch.Tensor, mem: torch.Tensor) -> bool:
        """The edit is right (every answer token is the argmax) and the memory margins hold: every
        memory input below β and at least γ below each neuron's activation on the edit."""
        cfg = self.config
        right = bool((logits.argmax(-1) == batch.answer_labels).all())
        low = bool((mem <= cfg.memory_ceiling).all()) and bool((mem <= act[None] - cfg.margin).all())
        return right and low

    def _patch_loss(self, act: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """alc·L_a + mlc·L_m: fire on the edit (act (n,)), stay below it and below β on memory (M, n)."""
        cfg = self.config
        below_edit = _top_mean(torch.exp(mem - act[None] + cfg.margin), cfg.top_k)
        below_ceiling = _top_mean(torch.exp(mem - cfg.memory_ceiling), cfg.top_k)
        return cfg.act_weight * torch.exp(-act).mean() + cfg.memory_weight * (below_edit + below_ceiling)


def _top_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries (the original's ``topk_exp``)."""
    flat = values.reshape(-1)
    return torch.topk(flat, min(k, flat.numel())).values.mean()


def _edit_nll(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """Mean over items of each item's mean target NLL, from answer logits (N, V) (``LVLM.loss``)."""
    nll = F.cross_entropy(logits.float(), batch.answer_labels, reduction="none")  # (N,)
    rows, _ = batch.answer_positions  # (N,)
    lengths = torch.tensor(batch.answer_lengths, dtype=nll.dtype, device=nll.device)  # (B,)
    return (torch.zeros_like(lengths).index_add(0, rows, nll) / lengths).mean()


def _activations(live: Patch, memory: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        act = (live.queries * live.keys).sum(-1) + live.biases  # (n,)
        mem = memory @ live.keys.T + live.biases  # (M, n)
    return {"edit_activation": float(act.min()), "memory_activation": float(mem.max())}


def _mistakes(
    model: LVLM, patcher: PatchedFFN, batch: Batch, cap: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The site's inputs (n, I) at the positions predicting each item's wrongly predicted answer
    tokens (at most ``cap`` per item, in answer order), each one's item (n,), and the output width D.
    """
    with torch.no_grad():
        wrong = model.logits(batch).argmax(-1) != batch.answer_labels  # (N,)
    x, y = layer_io(model, patcher.inner, batch)  # (B, T, I), (B, T, D)
    rows, cols = batch.answer_positions  # (N,), (N,)
    picked = [(rows == b).nonzero().squeeze(1) for b in range(batch.size)]
    picked = [p[wrong[p]][:cap] for p in picked]  # answer indices, per item
    index = torch.cat(picked)  # (n,)
    queries = x[rows[index], cols[index] - 1].float()  # (n, I)
    return queries, rows[index], int(y.shape[-1])


def _token_inputs(model: LVLM, patcher: PatchedFFN, samples: list[Sample], chunk: int = 16) -> torch.Tensor:
    """The site's inputs at every real token of the memory samples (M, I), float32."""
    rows = []
    for start in range(0, len(samples), chunk):
        batch = model.encode(samples[start : start + chunk])
        x, _ = layer_io(model, patcher.inner, batch)  # (B, T, I)
        rows.append(x[batch.inputs["attention_mask"].bool()].float())  # (m, I)
    return torch.cat(rows)
