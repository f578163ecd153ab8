"""mmke from Python on the embedded default: edit one fact, look at the edited model, undo it, and
run a small evaluation (docs/api.md). Runs offline on a laptop CPU in about half a minute:

    python examples/python_api.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import mmke


def main(out: str) -> None:
    bench = mmke.load_benchmark("world")
    model = mmke.load_model("world", images=bench)  # the model opens the benchmark's pictures
    editor = mmke.load_method("rome", model, train_cases=bench.train_cases)

    case = bench.cases[0]  # "what is the name of the animal in the image ?" -> a counterfactual name
    print(f"edit: {case.edit.prompt} -> {case.edit.target} (was {case.edit.ground_truth})")
    print("before:", model.generate([case.edit], max_new_tokens=4)[0])
    with editor.apply(model, case) as edited:  # restored, bit for bit, on leaving the block
        print("after: ", edited.generate([case.edit], max_new_tokens=4)[0])
        for probe, score in zip(case.probes[:4], edited.score(case.probes[:4]), strict=True):
            print(f"  {probe.kind.value:<16} token accuracy {score.token_accuracy:.2f}  {probe.prompt}")
    print("restored:", model.generate([case.edit], max_new_tokens=4)[0])

    # a hand-written edit on the same picture: the name of its look-alike instead
    look_alike = next(p.target for p in case.probes if p.kind == mmke.ProbeKind.IMAGE_LOCALITY)
    image = case.edit.image.path if case.edit.image else None
    mine = mmke.edit_case(case.edit.prompt, look_alike, image=image)
    with editor.apply(model, mine) as edited:
        print(f"hand-written edit -> {look_alike}:", edited.generate([mine.edit], max_new_tokens=4)[0])

    # the same evaluation `mmke run methods=[ft_llm,rome] limit=8` runs, with its typed summary back
    summary = mmke.evaluate(methods=["ft_llm", "rome"], limit=8, out=out, run_id="python-api")
    for group in summary.groups:
        if group.edit_type == "all" and group.task is None:
            rel, loc = group.metrics.get("reliability"), group.metrics.get("text_locality")
            print(f"{group.method:<8} Rel {rel:.3f}  T-Loc {loc:.3f}  ({group.n_cases} cases)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="mmke-api-"))
