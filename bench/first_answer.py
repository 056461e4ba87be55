"""Page to first tuned answer: how long a newcomer waits, measured in a real browser.

    python bench/first_answer.py [--out bench/results] [--question "What is the capital of Portugal?"]

Starts the studio on a fresh data folder (the bundled model already converted, as set-up leaves it), opens the page
in Debian's headless Chromium, presses "Quick demo", waits for "Chat with it", presses it, asks one question and
waits until the fine-tuned reply has finished. Prints and (with --out) writes the seconds of each part:
  page: the page answered and drawn;  training: Quick demo pressed -> the run completed (start-up, the 24 steps,
  the evaluations and the end-of-run forgetting check);  chat: "Chat with it" pressed -> both replies finished;
  total: the first page load -> the tuned reply.
The machine's load average is written alongside: the number means "2 idle cores" only when it was near zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic"]


def settled_text(page, selector: str, pause: float = 1.0) -> str:
    """The element's text once it has stopped changing (a streaming reply has ended)."""
    previous = None
    while previous != (current := page.locator(selector).last.inner_text()):
        previous = current
        time.sleep(pause)
    return current


def measure(question: str) -> dict:
    from playwright.sync_api import sync_playwright

    from studio.paths import model_cache_dir
    from tests.servers import Server
    home = Path(tempfile.mkdtemp(prefix="first-answer-"))
    env = {"STUDIO_HOME": str(home), "STUDIO_MODEL_CACHE": str(model_cache_dir())}
    server = Server(home / "server.log", env=env)
    parts: dict[str, float] = {}
    try:
        server.wait_ready()
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROME_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(1_800_000)
            start = time.perf_counter()
            page.goto(server.url)
            page.locator("#quick-demo").wait_for()
            parts["page"] = time.perf_counter() - start
            pressed = time.perf_counter()
            page.locator("#quick-demo").click()
            page.locator("#train-chat-with").wait_for(state="visible")
            parts["training"] = time.perf_counter() - pressed
            asked = time.perf_counter()
            page.locator("#train-chat-with").click()
            page.wait_for_function("() => (document.querySelector('#chat-run input')?.value || '') !== ''")
            page.locator("#chat-prompt textarea").fill(question)
            page.locator("#chat-send").click()
            # The reply has begun when the tuned panel's bot message holds text; it has ended when that text stops
            # changing.
            bot = "#chat-tuned .message.bot, #chat-tuned [data-testid='bot']"
            page.wait_for_function("sel => [...document.querySelectorAll(sel)].some(e => e.innerText.trim())", arg=bot)
            reply = settled_text(page, bot, pause=3.0).strip()
            parts["chat"] = time.perf_counter() - asked
            parts["total"] = time.perf_counter() - start
            browser.close()
        metrics = _training_seconds(home)
    finally:
        server.stop()
    return {"seconds": {k: round(v, 1) for k, v in parts.items()}, "training_seconds_in_metrics": metrics,
            "tuned_reply": reply, "question": question, "load_average_after": os.getloadavg(),
            "cores": os.cpu_count(), "home": str(home)}


def _training_seconds(home: Path) -> float | None:
    """The run's own clock at its last logged row (metrics.jsonl's elapsed_s: from the trainer's start to the
    last evaluation), as the README's demo table reports it."""
    for metrics in (home / "runs").glob("*/metrics.jsonl"):
        times = [row["elapsed_s"] for row in map(json.loads, metrics.read_text().splitlines())
                 if "elapsed_s" in row]
        return round(max(times), 1) if times else None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", default="What is the capital of Portugal?")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = {"load_average_before": load_before, **measure(args.question)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = time.strftime("first-answer-%Y%m%d-%H%M.json")
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
