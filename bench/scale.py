"""Every method at real width: what one edit costs on a 7B-wide model, projected to full depth.

Run: ``.venv/bin/python bench/scale.py`` (``--help`` for options; the default, LLaVA-1.5-7B in
float32 and bfloat16, takes about 30 minutes per dtype on 2 CPU cores and under 12 GiB).

The main families are built at their real width with only a few decoder layers, random weights,
from the real transformers classes (nothing is downloaded):

- ``llava-1.5-7b``: Llama 4096 wide, MLP 11008, 32 heads, vocabulary 32064; CLIP ViT-L/14 at 336 px
  (576 image tokens), 1024 wide;
- ``qwen2.5-vl-7b``: Qwen2 3584 wide, MLP 18944, 28 heads (4 key/value), vocabulary 152064; its
  1280-wide vision tower on 448 px (256 image tokens);
- ``blip2-opt-2.7b``: OPT 2560 wide, FFN 10240, vocabulary 50272; EVA ViT-g 1408 wide on 224 px,
  a 768-wide Q-Former with 32 queries.

For each (model, dtype, method) it trains what the method needs (trained editors one step: their
cost, not their quality, is measured), applies one edit, scores its probes, restores, and checks
every weight is back bit for bit. It prints per method: the edit's wall time; the peak memory of
the process above the resting model during apply + score + restore; what the live edit holds
(resident memory while it is applied, above the resting model); the snapshot of the edited
parameters (what restoring needs); the method's own state (memory its trained networks, key
statistics or demonstrations took when it was prepared). Each is measured at two decoder depths
(the vision tower stays at ``--vision-layers``) and projected linearly to the model's full depth;
a method that edits the last three layers (MEND, KE, MEMIT) is measured from three layers on,
so that both depths edit the same layers.

Goals (``ok`` column): the live edit holds at most 1.2x the snapshot of the edited parameters
(+ 64 MB for allocator slack), and no method's peak reaches a second copy of the model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmke.data.images import ImageStore
from mmke.eval._efficiency import measure
from mmke.methods import Editor
from mmke.models import LVLM
from mmke.models.tiny import bpe_tokenizer
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

#: Per method: settings that keep one edit short at real width (trained editors: one step).
SETTINGS: dict[str, dict[str, Any]] = {
    "ft_llm": {"steps": 5},
    "ft_projector": {"steps": 5},
    "ft_vision": {"steps": 5},
    "lora": {"steps": 5},
    "ike": {"k": 2},
    "serac": {"train_steps": 1, "cf_layers": 1},
    "mend": {"train_steps": 1},
    "ke": {"train_steps": 1},
    "grace": {},
    "wise": {"steps": 5},
    "rome": {"v_steps": 5},
    "memit": {"v_steps": 5},
}
SLACK_MB = 64.0
#: Methods that edit the last three decoder layers (MEND's, KE's and MEMIT's defaults) are measured
#: from this depth on, so both depths edit the same layers and the line through them is depth's own.
MIN_DEPTH = {"mend": 3, "ke": 3, "memit": 3}


@dataclass(frozen=True)
class Spec:
    """A model to build at real width: its full depth and a builder for (text layers, vision layers)."""

    full_depth: int
    build: Callable[[int, int], LVLM]
    image_size: int


def _settle() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc keeps them otherwise), so
    resident memory read next is what is still held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _used_mb(device: torch.device) -> float:
    """Memory in use now: the process's resident memory on the CPU, the allocator's on a GPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the models ---------------------------------------------------------------------------


def llava_7b(depth: int, vision_layers: int) -> LVLM:
    from mmke.models._construct import llava_from_sizes

    text = {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": depth,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "vocab_size": 32064,
    }
    vision = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 16,
        "patch_size": 14,
        "projection_dim": 768,
    }
    return llava_from_sizes(bpe_tokenizer(["<image>"]), vision, text, 336, seed=0)


def qwen25_vl_7b(depth: int, vision_layers: int) -> LVLM:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmke.models.tiny import _qwen_ids, _qwen_processor

    tiny = _qwen_processor()
    tok = tiny.tokenizer
    processor = type(tiny)(
        Qwen2VLImageProcessorPil(size={"shortest_edge": 448 * 448, "longest_edge": 448 * 448}),
        tok,
        chat_template=tiny.chat_template,
    )
    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": depth,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    }
    vision = {
        "depth": vision_layers,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [vision_layers - 1],
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    return LVLM(_random(Qwen2_5_VLForConditionalGeneration, config), processor, "qwen2_vl")


def blip2_opt_2b7(depth: int, vision_layers: int) -> LVLM:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = bpe_tokenizer(["<image>"])
    processor = Blip2Processor(
        BlipImageProcessorPil(size={"height": 224, "width": 224}), tok, num_query_tokens=32
    )
    opt = OPTConfig(
        vocab_size=50272,
        hidden_size=2560,
        ffn_dim=10240,
        num_hidden_layers=depth,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = Blip2VisionConfig(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=vision_layers, num_attention_heads=16
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=Blip2QFormerConfig(num_hidden_layers=vision_layers, encoder_hidden_size=1408),
        text_config=opt,
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return LVLM(_random(Blip2ForConditionalGeneration, config), processor, "blip2")


def _random(cls: type, config: Any) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(config).eval()


SPECS = {
    "llava-1.5-7b": Spec(32, llava_7b, 336),
    "qwen2.5-vl-7b": Spec(28, qwen25_vl_7b, 448),
    "blip2-opt-2.7b": Spec(32, blip2_opt_2b7, 224),
}


# --- one edit -----------------------------------------------------------------------------


def cases() -> tuple[EditCase, list[EditCase]]:
    """The edit measured and a few train cases (demonstrations, key statistics, one training step)."""

    def case(target: str, prompt: str, image: str) -> EditCase:
        img = ImageRef(image)
        probes = (
            Probe(ProbeKind.RELIABILITY, prompt, target, img),
            Probe(ProbeKind.TEXT_GENERALITY, "the capital of france is", target),
            Probe(ProbeKind.TEXT_LOCALITY, "london is a city in", "england"),
            Probe(ProbeKind.IMAGE_LOCALITY, "what is the colour of the sign?", "red", img),
        )
        edit = EditFact(prompt, target, img, ground_truth="paris")
        return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, edit, probes, subject="france")

    train = [
        case("berlin", "what is the capital of france in this picture?", "blue.png"),
        case("madrid", "the capital of france shown here is", "red.png"),
    ]
    return case("rome", "what is the capital of france?", "red.png"), train


def fingerprint(model: LVLM) -> dict[str, tuple[float, float]]:
    """Per parameter its sum and the sum of its squares in float64: a changed weight changes them
    (a full copy of the weights would double the memory this bench measures)."""
    out = {}
    for name, p in model.model.state_dict().items():
        x = p.detach().double()
        out[name] = (float(x.sum()), float((x * x).sum()))
    return out


@dataclass
class Row:
    model: str
    dtype: str
    depth: int
    method: str
    model_mb: float
    seconds: float = float("nan")
    peak_mb: float = float("nan")
    held_mb: float = float("nan")
    snapshot_mb: float = float("nan")
    state_mb: float = float("nan")
    restored: bool = False
    error: str = ""


def measure_method(label: str, model: LVLM, dtype: str, depth: int, method: str) -> Row:
    model_mb = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    row = Row(label, dtype, depth, method, model_mb)
    edit, train = cases()
    _settle()
    before_state = _used_mb(model.device)
    try:
        editor: Editor[Any] = methods.get(method)(SETTINGS.get(method))
        if editor.needs_train_cases:
            editor.train(model, train)
        _settle()
        row.state_mb = _used_mb(model.device) - before_state
        before = fingerprint(model)
        _settle()
        rest = _used_mb(model.device)
        with measure(model.device) as m:
            edited = editor.apply(model, edit)
            _settle()
            row.held_mb = _used_mb(model.device) - rest
            row.snapshot_mb = edited.edited_params * next(model.model.parameters()).element_size() / 2**20
            edited.score(edit.probes)
            edited.restore()
        row.seconds, row.peak_mb = m.seconds, m.peak_mb - rest
        row.restored = fingerprint(model) == before
    except Exception as e:  # a method that fails at real width is a finding, not the end of the run
        row.error = f"{type(e).__name__}: {e}"[:160]
    return row


def project(a: Row, b: Row, full: int, field: str) -> float:
    """``field`` at ``full`` decoder layers, on the line through its values at two depths."""
    va, vb = getattr(a, field), getattr(b, field)
    return va + (vb - va) / (b.depth - a.depth) * (full - a.depth)


def method_depths(method: str, depths: tuple[int, int]) -> tuple[int, int]:
    """The two depths ``method`` is measured at: ``depths``, moved up to its ``MIN_DEPTH``."""
    shift = max(0, MIN_DEPTH.get(method, 0) - depths[0])
    return depths[0] + shift, depths[1] + shift


def _pair(a: Row, b: Row, field: str) -> str:
    """``field`` at the two depths, "a / b"."""
    digits = 1 if field == "seconds" else 0
    return f"{getattr(a, field):.{digits}f} / {getattr(b, field):.{digits}f}"


def print_table(rows: list[Row], specs: dict[str, Spec]) -> None:
    head = (
        "| model | dtype | method | layers | edit s | peak +MB | live edit MB | snapshot MB | state MB "
        "| full depth: edit s / peak +MB / state MB | restored | ok |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    pairs: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        pairs.setdefault((r.model, r.dtype, r.method), []).append(r)
    for (model, dtype, method), (a, b) in ((k, sorted(v, key=lambda r: r.depth)) for k, v in pairs.items()):
        if a.error or b.error:
            print(f"| {model} | {dtype} | {method} | {a.depth}, {b.depth} | failed: {a.error or b.error} |")
            continue
        full = specs[model].full_depth
        f_s, f_peak, f_state, f_model = (
            project(a, b, full, k) for k in ("seconds", "peak_mb", "state_mb", "model_mb")
        )
        ok = b.held_mb <= 1.2 * b.snapshot_mb + SLACK_MB and f_peak < f_model
        measured = [_pair(a, b, k) for k in ("seconds", "peak_mb", "held_mb", "snapshot_mb", "state_mb")]
        print(
            f"| {model} | {dtype} | {method} | {a.depth}, {b.depth} | {' | '.join(measured)} "
            f"| {f_s:.0f} / {f_peak:.0f} / {f_state:.0f} "
            f"| {'yes' if a.restored and b.restored else 'NO'} | {'yes' if ok else 'NO'} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llava-1.5-7b", help=f"comma-separated, of {', '.join(SPECS)}")
    p.add_argument("--methods", default=",".join(SETTINGS), help="comma-separated method names")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--depths", default="1,2", help="two decoder depths to measure and project from")
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("MMKE_BENCH_THREADS", torch.get_num_threads())))
    root = Path(tempfile.mkdtemp(prefix="mmke-scale-"))
    os.environ.setdefault("MMKE_CACHE", str(root / "cache"))  # trained editors and statistics stay here
    Image.new("RGB", (640, 480), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (480, 640), (20, 20, 220)).save(root / "blue.png")
    depths = tuple(int(d) for d in args.depths.split(","))
    if len(depths) != 2 or depths[0] >= depths[1]:
        raise SystemExit("--depths: two increasing depths, e.g. 1,2")
    specs = {m: SPECS[m] for m in args.models.split(",")}
    chosen = args.methods.split(",")
    plan: dict[int, list[str]] = {}  # depth -> the methods measured at it
    for method in chosen:
        for depth in method_depths(method, depths):
            plan.setdefault(depth, []).append(method)
    rows: list[Row] = []
    for label, spec in specs.items():
        for dtype in args.dtypes.split(","):
            for depth, todo in sorted(plan.items()):
                start = time.perf_counter()
                model = spec.build(depth, args.vision_layers)
                model.model.to(args.device, getattr(torch, dtype))
                model.bind_images(ImageStore(root))
                model.score(cases()[0].probes)  # untimed: the first forward's one-off costs
                print(f"# {label} {dtype} at {depth} layers: built in {time.perf_counter() - start:.0f} s")
                for method in todo:
                    row = measure_method(label, model, dtype, depth, method)
                    rows.append(row)
                    print(
                        f"  {method}: {row.seconds:.1f} s, peak +{row.peak_mb:.0f} MB, live edit "
                        f"{row.held_mb:.0f} MB, snapshot {row.snapshot_mb:.0f} MB, "
                        f"state {row.state_mb:.0f} MB {row.error}",
                        flush=True,
                    )
                del model
                gc.collect()
    print()
    print_table(rows, specs)


if __name__ == "__main__":
    main()
