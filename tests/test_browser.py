"""A real browser (Debian's headless Chromium, driven by Playwright) clicks through every tab on the
bundled model, the way a newcomer would. Screenshots go to $STUDIO_SCREENSHOTS (default: a temp dir);
the README's come from this test."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")]
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture()
def server(studio_home, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "studio", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    import httpx
    for _ in range(240):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1360, "height": 1000})
        pg.set_default_timeout(600_000)  # state waits: a busy 2-core machine took 233 s for 6 steps
        pg.goto(server)
        yield pg
        browser.close()


def shots() -> Path:
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or "/tmp/studio-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tab(page, label):
    page.get_by_role("tab", name=label).click()


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]")
    advanced = page.locator("#train-advanced")
    for _ in range(1200):  # until the tab is drawn: on a busy machine, some time after its click
        if box.is_visible() or advanced.is_visible():
            break
        time.sleep(0.5)
    if not box.is_visible() and advanced.is_visible():
        # A setting under the Train tab's folded "Advanced settings": unfold it, as a person would.
        advanced.get_by_text("Advanced settings").first.click()
    box.fill(str(value))
    box.press("Tab")


def test_newcomer_tour_of_every_tab(page):
    # 1. Model: the bundled default, described before anything trains.
    page.locator("#model-load").click()
    page.locator("#model-status").get_by_text("Loaded").wait_for()
    assert "LlamaForCausalLM" in page.locator("#model-info").inner_text()
    assert "QLoRA" in page.locator("#model-memory").inner_text()
    page.screenshot(path=shots() / "1-model.png", full_page=True)

    # 2. Data: the demo set, previewed, with the rendered sample and the length histogram.
    tab(page, "2 · Data")
    page.locator("#data-demo").click()
    page.locator("#data-summary").get_by_text("messages format").wait_for()
    assert "95 usable of 95 rows" in page.locator("#data-summary").inner_text()
    assert "Ahoy, matey!" in page.locator("#data-preview").inner_text()
    assert "<|im_start|>" in page.locator("#data-sample").inner_text()
    page.screenshot(path=shots() / "2-data.png", full_page=True)

    # 3. Train: a short run on the demo preset; the live plot and progress update; a reload re-attaches.
    tab(page, "3 · Train")
    set_number(page, "training-max-steps", 6)
    set_number(page, "training-eval-steps", 3)
    page.locator("#train-name").locator("textarea, input").first.fill("browser-run")
    page.locator("#train-start").click()
    page.locator("#train-progress").get_by_text(re.compile(r"Step [2-6] of 6")).wait_for()
    page.reload()
    tab(page, "3 · Train")
    page.locator("#train-status").get_by_text("browser-run").wait_for()
    page.locator("#train-status").get_by_text("completed").wait_for()
    assert "Step 6 of 6" in page.locator("#train-progress").inner_text()
    log = page.locator("#train-log textarea").input_value()
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", log)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    page.screenshot(path=shots() / "3-train.png", full_page=True)

    # 4. Chat: "Chat with it" on the finished run opens the Chat tab on it; the same prompt to base and
    # fine-tuned, side by side.
    page.locator("#train-chat-with").click()
    page.wait_for_function("() => document.querySelector('#chat-run input')?.value === 'browser-run'",
                           timeout=120_000)
    page.locator("#chat-prompt textarea").fill("What is the capital of Portugal?")
    page.locator("#chat-send").click()
    page.locator("#chat-base .message.bot, #chat-base [data-testid='bot']").first.wait_for()
    previous = None
    while previous != (current := page.locator("#chat-base").inner_text()):  # wait until streaming ends
        previous = current
        time.sleep(2)
    for panel in ("#chat-base", "#chat-tuned"):  # the prompt and a non-empty reply in each
        assert len(page.locator(panel).inner_text().replace("What is the capital of Portugal?", "").strip()) > 10
    page.screenshot(path=shots() / "4-chat.png", full_page=True)

    # 5. Export: a downloadable adapter zip.
    tab(page, "5 · Export")
    page.locator("#export-run input").click()
    page.get_by_role("option", name="browser-run").click()
    page.locator("#export-adapter").click()
    page.locator("#export-files").get_by_text("browser-run-adapter").wait_for()
    page.screenshot(path=shots() / "5-export.png", full_page=True)

    # Evaluate: base against tuned on 4 held-out prompts, the summary and every row; then a blind vote.
    tab(page, "6 · Evaluate")
    page.locator("#eval-run input").click()
    page.get_by_role("option", name="browser-run").click()
    set_number(page, "evaluate-max-rows", 4)
    set_number(page, "evaluate-max-new-tokens", 16)
    page.locator("#evaluate-forgetting input").uncheck()  # its 80 questions are tested in test_evaluation.py
    page.locator("#eval-start").click()
    page.locator("#eval-status").get_by_text("completed").wait_for()
    assert "Evaluated 4 rows, base -> browser-run" in page.locator("#eval-summary").inner_text()
    assert "loss on the reference answers" in page.locator("#eval-summary").inner_text()
    assert "Ahoy" in page.locator("#eval-rows").inner_text()  # the demo's references are pirate replies
    page.locator("#eval-blind-next").click()
    page.locator("#eval-blind-prompt").get_by_text("left to compare").wait_for()
    assert page.locator("#eval-blind-a textarea").input_value().strip()
    page.locator("#eval-vote-a").click()
    page.locator("#eval-blind-tally").get_by_text("of 1").wait_for()
    page.screenshot(path=shots() / "7-evaluate.png", full_page=True)

    # 6. Preferences: DPO from its preset, starting from the run above; its data is a pair shown side by side,
    # its plot the stage's own curves.
    tab(page, "3 · Train")
    page.locator("#train-preset input").click()
    page.get_by_role("option", name="demo-dpo").click()
    page.get_by_role("button", name="Load preset").click()
    tab(page, "2 · Data")
    page.locator("#data-source").get_by_text("demo-dpo").wait_for()  # the stage changed, and the demo set with it
    page.locator("#data-check").click()
    page.locator("#data-summary").get_by_text("preference format").wait_for()
    assert "Certainly!" in page.locator("#data-sample").inner_text()
    assert "<|im_start|>" in page.locator("#data-sample-rejected").inner_text()
    tab(page, "3 · Train")
    page.locator("#train-start-from input").click()
    page.get_by_role("option", name="browser-run (sft)").click()
    set_number(page, "training-max-steps", 2)
    set_number(page, "training-batch-size", 2)
    set_number(page, "training-eval-steps", 2)
    page.locator("#train-name").locator("textarea, input").first.fill("browser-dpo")
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text("browser-dpo").wait_for()
    page.locator("#train-status").get_by_text("completed").wait_for()
    page.locator("#train-stage-plot").get_by_text("reward margin").first.wait_for()
    page.screenshot(path=shots() / "6-dpo.png", full_page=True)


# The Train tab's run panel: a refused Start must not put Gradio's red "Error" badge over these.
RUN_PANEL = ("#train-status", "#train-progress", "#train-plot", "#train-log", "#train-samples")


def visible_error_badges(page) -> int:
    """Gradio's status tracker marks each output of a failed event with a span.error reading "Error". For an event
    with hidden progress the span is still there, under a tracker made transparent, so a badge counts only where
    neither it nor a box around it is undisplayed, invisible or transparent."""
    return page.evaluate("""sels => sels.flatMap(s => [...document.querySelectorAll(s + ' span.error')])
        .filter(e => e.textContent.trim() === 'Error' && e.offsetParent !== null)
        .filter(e => { for (let n = e; n && n !== document.body; n = n.parentElement) {
                           const st = getComputedStyle(n);
                           if (st.visibility === 'hidden' || parseFloat(st.opacity) === 0) return false; }
                       return true; }).length""", list(RUN_PANEL))


def test_quick_demo_starts_and_stop_saves(page):
    # A mistake first: the refusal names the field in one message, and no red badge covers the run panel.
    tab(page, "3 · Train")
    set_number(page, "training-warmup-ratio", 5)
    page.locator("#train-start").click()
    page.get_by_text(re.compile(r"Warm-up share")).first.wait_for()
    assert visible_error_badges(page) == 0
    # Resume with no run picked is refused the same way.
    page.locator("#train-history").get_by_text("Past runs").first.click()
    page.locator("#runs-resume").click()
    page.get_by_text(re.compile(r"Pick a run to resume")).first.wait_for()
    assert visible_error_badges(page) == 0
    page.locator("#quick-demo").click()
    page.locator("#train-status").get_by_text("demo").wait_for()
    page.locator("#train-progress").get_by_text(re.compile(r"Step [1-9]\d* of 24")).wait_for()
    # One click brings the person to the run: the progress is on screen without scrolling.
    assert page.locator("#train-progress").evaluate(
        "e => { const r = e.getBoundingClientRect(); return r.height > 0 && r.top >= 0 && r.top < innerHeight; }")
    page.locator("#train-stop").click()
    page.locator("#train-status").get_by_text("Stopped by you").wait_for()
    assert "completed" in page.locator("#train-status").inner_text()


def test_an_upload_comes_back_checked_after_a_reload(page, tmp_path):
    """The last upload is remembered by the browser: after a reload the Data tab is on it again, with its checks
    and preview shown without pressing 'Check the data'."""
    rows = tmp_path / "my-questions.jsonl"
    rows.write_text("".join(f'{{"instruction": "Question {i}?", "output": "Answer {i}."}}\n' for i in range(12)))
    tab(page, "2 · Data")
    page.locator("#data-upload input[type=file]").set_input_files(str(rows))
    page.locator("#data-summary").get_by_text("12 usable of 12 rows").wait_for()
    page.reload()
    tab(page, "2 · Data")
    page.locator("#data-source").get_by_text("my-questions").wait_for()
    page.locator("#data-summary").get_by_text("12 usable of 12 rows").wait_for()
    assert "Question 3?" in page.locator("#data-preview").inner_text()
