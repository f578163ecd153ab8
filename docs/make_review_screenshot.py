"""Make docs/review.png: the review page of the medical example build with two decisions made, taken
with Playwright and the system Chromium (no browser download).

    .venv/bin/python docs/make_review_screenshot.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from mmke.data.build import Pipeline, run_pipeline
from mmke.data.build.review import CHROMIUM, CHROMIUM_ARGS, serve


def _medical(tmp: Path) -> Path:
    """The medical example pipeline built into ``tmp``: its review items are what the page shows."""
    out = tmp / "medical"
    run_pipeline(Pipeline.read(Path(__file__).parents[1] / "examples" / "pipelines" / "medical.yaml"), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("review.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, serve(_medical(Path(tmp))) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS), headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(server.url)
        cards = page.locator("section.item")
        cards.nth(0).get_by_role("button", name="Accept").click()
        cards.nth(1).get_by_role("button", name="Edit").click()
        cards.nth(1).locator('textarea[data-field="rephrase"]').fill(
            "which finding is visible on this ct scan of the chest ?"
        )
        cards.nth(1).get_by_role("button", name="Save").click()
        expect(page.locator("#saved")).to_have_text("all saved")
        cards.nth(2).locator("header").click()  # leave the current-item outline on the undecided one
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
