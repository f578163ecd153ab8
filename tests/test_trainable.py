"""The shared meta-training loop: deterministic resume, saved editors found and refused, bad files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods import EditorNotReadyError, PromptEdited
from mmke.methods.trainable import (
    CHECKPOINT_META,
    WEIGHTS,
    EditorFileError,
    TrainableEditor,
    TrainingConfig,
    model_fingerprint,
)
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.types import EditCase
from test_methods import make_case


@dataclass(frozen=True)
class ToyConfig(TrainingConfig):
    width: int = 3


class Toy(TrainableEditor[ToyConfig]):
    """Learns a vector pulled towards the mean input embedding of the sampled edits."""

    name = "toy"
    defaults = ToyConfig(train_steps=6, checkpoint_every=3, train_batch=2, train_lr=0.1)

    def build(self, model: LVLM) -> nn.Module:
        return nn.Linear(self.config.width, 1)

    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        target = torch.tensor([float(len(c.edit.target)) for c in cases])  # (B,)
        x = torch.ones(len(cases), self.config.width)  # (B, W)
        loss = ((nets(x).squeeze(-1) - target) ** 2).mean()
        return loss, {"mean_target": float(target.mean())}

    def apply(self, model: LVLM, case: EditCase) -> PromptEdited:
        nets = self.networks(model)
        return PromptEdited(model, lambda p: p, {"bias": float(nets.bias.detach())})


CASES = [make_case(t, image=None) for t in ("rome", "berlin", "oslo", "vienna", "lima")]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def weights(editor: Toy, model: LVLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in editor.networks(model).state_dict().items()}


def test_resumed_training_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    model = tiny_model("causal_lm")
    whole = Toy()
    whole.fit(model, CASES, tmp_path / "whole")
    # stop after the first checkpoint (step 3), then resume with a fresh editor
    half = Toy({"train_steps": 6})
    first = Toy({"train_steps": 6})
    loop_out = tmp_path / "half"
    _interrupt_after(first, model, loop_out, steps=4)
    assert (loop_out / CHECKPOINT_META).is_file()
    summary = half.fit(model, CASES, loop_out)
    assert summary["resumed_at"] == 3
    for k, v in weights(whole, model).items():
        assert torch.equal(v, weights(half, model)[k])


def _interrupt_after(editor: Toy, model: LVLM, out: Path, steps: int) -> None:
    def stop(step: int, total: int, loss: float, stats: object) -> None:
        if step == steps:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        editor.fit(model, CASES, out, progress=stop)


def test_train_caches_the_editor_and_a_new_editor_finds_it() -> None:
    model = tiny_model("causal_lm")
    editor = Toy()
    with pytest.raises(EditorNotReadyError, match="mmke train-editor"):
        editor.apply(model, CASES[0])
    editor.train(model, CASES)
    path = editor.cache_path(model)
    assert (path / WEIGHTS).is_file()
    again = Toy()
    assert again.find_saved(model) == path
    assert again.apply(model, CASES[0]).details == editor.apply(model, CASES[0]).details
    assert Toy({"width": 4}).find_saved(model) is None  # another config is another editor


def test_an_editor_for_another_model_or_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    model, other = tiny_model("causal_lm", seed=0), tiny_model("causal_lm", seed=1)
    assert model_fingerprint(model) != model_fingerprint(other)
    Toy().fit(model, CASES, tmp_path / "ed")
    with pytest.raises(EditorFileError, match="different model"):
        Toy({"editor_path": str(tmp_path / "ed")}).networks(other)
    (tmp_path / "ed" / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(EditorFileError, match="safetensors"):
        Toy({"editor_path": str(tmp_path / "ed")}).networks(model)
    with pytest.raises(EditorFileError, match="holds no"):
        Toy({"editor_path": str(tmp_path / "none")}).networks(model)


def test_training_without_cases_says_so(tmp_path: Path) -> None:
    with pytest.raises(EditorNotReadyError, match="train cases"):
        Toy().fit(tiny_model("causal_lm"), [], tmp_path)


def test_cosine_schedule_decays_the_rate_and_keys_the_editor_and_resumes_exactly(tmp_path: Path) -> None:
    model = tiny_model("causal_lm")
    assert "train_schedule" not in Toy().identity()  # editors saved before the option match
    assert Toy({"train_schedule": "cosine"}).identity()["train_schedule"] == "cosine"
    constant, cosine = Toy(), Toy({"train_schedule": "cosine"})
    constant.fit(model, CASES, tmp_path / "constant")
    cosine.fit(model, CASES, tmp_path / "cosine")
    assert not torch.equal(weights(constant, model)["bias"], weights(cosine, model)["bias"])
    resumed = Toy({"train_schedule": "cosine"})
    _interrupt_after(Toy({"train_schedule": "cosine"}), model, tmp_path / "cut", steps=4)
    resumed.fit(model, CASES, tmp_path / "cut")
    for k, v in weights(cosine, model).items():
        assert torch.equal(v, weights(resumed, model)[k])
    with pytest.raises(ConfigError, match="train_schedule"):
        Toy({"train_schedule": "linear"})
