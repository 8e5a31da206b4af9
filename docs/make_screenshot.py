"""Screenshot the app after a real run, for the README: serve it, click "Run both", wait, capture.

    pip install playwright && python docs/make_screenshot.py [--prompt "..."] [--out docs/app.png]

Uses Debian's Chromium (/usr/bin/chromium); playwright's own browser download is not needed.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    parser.add_argument("--out", default=str(ROOT / "docs" / "app.png"))
    parser.add_argument("--browser", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=int, default=600, help="seconds to wait for both runs")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import quanttree.app as app

    cache = app.EngineCache()
    cache.get("auto", "same")  # load before serving, so the page does not wait on it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build_app(cache)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.browser, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1250})
        page.goto(f"http://127.0.0.1:{port}/")
        page.get_by_label("Prompt").fill(args.prompt)
        page.get_by_role("button", name="Run both").click()
        page.get_by_text("done · plain").wait_for(timeout=args.timeout * 1000)
        page.wait_for_timeout(1500)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    demo.close()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
