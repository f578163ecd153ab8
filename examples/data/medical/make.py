"""Writes this folder's example inputs from a built world: a CSV of scan MCQs and a medical KG TSV.

    mmke build world --out out/world
    python examples/data/medical/make.py out/world

The scans are the world's own renderings (drawn by mmke's code), so the bundled world model
can answer them; the CSV has the shape a researcher's own data would have (GMAI-MMBench-like
columns: image, question, options A-D, answer), and the KG the shape of a triples export.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
from pathlib import Path

MODALITIES = {"ct": "ct scan", "xray": "xray"}
PARTS = ("chest", "head")
FINDINGS = ("mass", "cyst", "fracture", "tumor", "nodules", "stone")
MEDICAL = ("treated_with", "managed_by", "works_in")


def main(world: Path, here: Path) -> None:
    rng = random.Random(0)
    rows = []
    for modality, words in MODALITIES.items():
        for part in PARTS:
            for finding in FINDINGS:
                combo = f"{modality}-{part}-{finding}"
                image = f"images/{combo}.png"
                (here / "images").mkdir(exist_ok=True)
                shutil.copyfile(world / "images" / "scan" / combo / "i05.png", here / image)
                options = [finding, *rng.sample([f for f in FINDINGS if f != finding], 3)]
                rng.shuffle(options)
                question = f"which finding does this {words} of the {part} show ?"
                letters = dict(zip("ABCD", options, strict=True))
                answer = next(k for k, v in letters.items() if v == finding)
                rows.append({"id": combo, "image": image, "question": question, **letters, "answer": answer})
    with open(here / "items.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["id", "image", "question", "A", "B", "C", "D", "answer"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    data = json.loads((world / "world.json").read_text(encoding="utf-8"))
    names = {e["id"]: e["name"] for e in data["entities"]}
    with open(here / "kg.tsv", "w", encoding="utf-8", newline="") as f:
        f.write("subject\trelation\tobject\n")
        for s, r, o in data["triples"]:
            if r in MEDICAL:
                f.write(f"{names[s]}\t{r}\t{names[o]}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).parent)
