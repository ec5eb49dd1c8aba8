"""The Space in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``).

Never ``playwright install``: the browser is the system one.  Skipped (with the reason) only when
``/usr/bin/chromium`` is absent.  The Hub is :class:`tests.hubserver.HubServer`, seeded and served
by the helpers of ``tests/test_space.py``; adapter downloads are slowed by 0.7 s each so the
progress of a compression can be seen.

With ``LORASHARE_WRITE_SCREENSHOTS=1`` the test also writes the screenshot that the documentation
shows, ``docs/space.png`` (the Compress tab with its results), from the app as it is.  Without it
(as in CI) screenshots go to the test's temporary folder only, so a run never changes the tree.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zipfile
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "space.png"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
if importlib.util.find_spec("gradio") is None:  # not imported here: only the app process needs it
    pytest.skip("the Space needs gradio: pip install -e '.[dev]'", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (never `playwright install`)")

from lorashare import SHAREModel  # noqa: E402
from tests.test_space import NOT_FOR_VISITORS, THREE, TOKEN, launch_space  # noqa: E402

pytestmark = pytest.mark.slow

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    with launch_space(tmp_path_factory.mktemp("space_browser")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def textbox(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def test_compress_push_explore_in_the_browser(space, browser, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    # Slow each adapter download a little, so that the progress is on screen long enough to see.
    space.hub.inject_when(("delay", 0.7), method="GET", path_regex=r"adapter_model\.safetensors$", times=None)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(space.url)
        textbox(page, "adapter-ids").fill(THREE)
        page.locator("#compress-btn").click()

        # Live progress, adapter by adapter, then the results.
        expect(page.get_by_text(re.compile(r"Downloading tester/\S+ \([123]/3\)")).first).to_be_visible()
        expect(page.locator("#compress-status")).to_contain_text("Compressed 3 adapters")
        expect(page.locator("#stats")).to_contain_text("compression ratio excluding bases")
        expect(page.locator("#fidelity")).to_contain_text("refunds-lora")
        page.screenshot(path=str(tmp_path / "space-compress.png"), full_page=True)
        if os.environ.get("LORASHARE_WRITE_SCREENSHOTS") == "1":
            page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)

        # Download the checkpoint and load it.
        with page.expect_download() as dl:
            page.locator("#checkpoint-zip").get_by_role("link").first.click()
        archive = tmp_path / "checkpoint.zip"
        dl.value.save_as(archive)
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp_path / "unzipped")
        share = SHAREModel.from_pretrained(tmp_path / "unzipped" / "share_checkpoint")
        assert share.adapter_names == ["billing-lora", "refunds-lora", "legal"]

        # Push with a pasted token (no SPACE_ID here, so no sign-in button).
        assert page.get_by_text("Sign in with Hugging Face").count() == 0
        textbox(page, "hf-token").fill(TOKEN)
        textbox(page, "push-repo").fill("tester/browser-share")
        page.locator("#push-btn").click()
        expect(page.locator("#push-result")).to_contain_text("Pushed 3 adapters")
        assert space.hub.repo("tester/browser-share").private
        assert "README.md" in space.hub.snapshot("tester/browser-share")

        # Explore the pushed (private) repo, then rebuild one adapter.
        page.get_by_role("tab", name="Explore").click()
        expect(textbox(page, "explore-repo")).to_have_value("tester/browser-share")  # filled in by the push
        textbox(page, "explore-repo").fill("tester/browser-share")
        page.locator("#explore-btn").click()
        expect(page.locator("#explore-card")).to_contain_text("tiny-bert-for-tests")
        expect(page.locator("#explore-adapters")).to_contain_text("legal")
        page.locator("#reconstruct-btn").click()
        expect(page.locator("#reconstruct-snippet")).to_contain_text("PeftModel.from_pretrained")
        expect(page.locator("#adapter-zip")).to_contain_text("billing-lora-peft-adapter")
        page.screenshot(path=str(tmp_path / "space-explore.png"), full_page=True)
    finally:
        page.close()
    assert (tmp_path / "space-explore.png").stat().st_size > 10_000
    assert not errors, errors
    assert TOKEN not in space.log.read_text()
    assert sorted(p.name for p in Path(space.tmpdir).iterdir()) == []


def test_empty_states_errors_and_try_it_in_the_browser(space, browser, tmp_path):
    """No empty tables before there are results; an error is a message a visitor can act on, gone at the next
    try; and Try it runs a checkpoint's adapters in one batch."""
    from tests.test_space_try import seed as seed_try

    seed_try(space.hub, tmp_path / "seed")  # tester/bert-share, on tester/tiny-bert
    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(space.url)
        expect(page.locator("#compress-btn")).to_be_visible()
        for hidden in ("#stats", "#fidelity", "#checkpoint-zip", "#push-btn"):  # nothing to show yet
            expect(page.locator(hidden)).to_be_hidden()

        textbox(page, "adapter-ids").fill("tester/billing-lora\ntester/gated-lora")
        page.locator("#compress-btn").click()
        message = page.get_by_text(re.compile("accept its conditions")).first
        expect(message).to_be_visible()
        shown = message.inner_text()
        assert "tester/gated-lora" in shown and "token field" in shown, shown
        assert not [a for a in NOT_FOR_VISITORS if a in shown], shown
        page.screenshot(path=str(tmp_path / "space-error.png"))
        expect(page.locator("#stats")).to_be_hidden()

        textbox(page, "adapter-ids").fill("tester/multi-lora/legal\ntester/multi-lora/extra")
        page.locator("#compress-btn").click()
        expect(page.get_by_text(re.compile("accept its conditions"))).to_have_count(0)  # the last try's message went
        expect(page.locator("#compress-status")).to_contain_text("Compressed 2 adapters")
        expect(page.locator("#stats")).to_contain_text("compression ratio")
        expect(page.locator("#push-btn")).to_be_visible()

        page.get_by_role("tab", name="Explore").click()
        expect(page.locator("#explore-btn")).to_be_visible()
        expect(page.locator("#reconstruct-btn")).to_be_hidden()  # no adapter to pick before a checkpoint is read
        textbox(page, "explore-repo").fill("tester/seed-share")
        page.locator("#explore-btn").click()
        expect(page.locator("#explore-adapters")).to_contain_text("legal")
        page.locator("#reconstruct-btn").click()
        expect(page.locator("#adapter-zip")).to_contain_text("billing-lora-peft-adapter")

        page.get_by_role("tab", name="Try it").click()
        expect(page.locator("#try-out")).to_be_hidden()
        textbox(page, "try-repo").fill("tester/bert-share")
        page.locator("#try-list-btn").click()
        expect(page.locator("#try-info")).to_contain_text("3 adapters on tester/tiny-bert")
        for name in ("task0", "task1", "task2"):
            expect(page.locator("#try-adapters")).to_contain_text(name)
        textbox(page, "try-text").fill("the film was not good")
        page.locator("#try-btn").click()
        expect(page.locator("#try-summary")).to_contain_text("one batch")
        out = page.locator("#try-out")
        for row in ("task0", "task1", "task2", "base model", "LABEL_"):
            expect(out).to_contain_text(row)
        page.screenshot(path=str(tmp_path / "space-try.png"), full_page=True)
    finally:
        page.close()
    assert (tmp_path / "space-try.png").stat().st_size > 10_000
    assert not errors, errors
    assert sorted(p.name for p in Path(space.tmpdir).iterdir()) == []
