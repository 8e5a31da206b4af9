"""Issue 7: the side-by-side app, headless through gradio_client and rendered in Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]


def load_app():
    import quanttree.app

    return quanttree.app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    return load_app()


@pytest.fixture(scope="module")
def served(app_module, tiny_dirs):
    cache = app_module.EngineCache(str(tiny_dirs["llama"]), str(tiny_dirs["llama-drafter"]), "cpu")
    demo = app_module.build_app(cache)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", cache
    demo.close()


def test_compare_streams_both_panes(app_module, tiny_dirs):
    cache = app_module.EngineCache(str(tiny_dirs["llama"]), str(tiny_dirs["llama-drafter"]), "cpu")
    updates = list(app_module.compare(cache, "the cat sat", 24, 0.0, "ddtree", 8, "fp32", "same"))
    assert len(updates) > 2  # streamed (throttled to the UI interval), not one final update
    ar_text, _, spec_text, spec_stats, badge, tree_fig, speed_fig, status = updates[-1]
    assert ar_text == spec_text and "identical" in badge and "speedup" in spec_stats and "accepted drafter" in spec_stats
    assert tree_fig is not None and speed_fig is not None and "one after the other" in status
    with pytest.raises(app_module.QuanttreeError, match="empty"):
        list(app_module.compare(cache, "  ", 8, 0.0, "ddtree", 8, "fp32", "same"))


def test_exact_checkbox_and_modes_without_it(app_module, tiny_dirs):
    cache = app_module.EngineCache(str(tiny_dirs["llama"]), str(tiny_dirs["llama-drafter"]), "cpu")
    list(app_module.compare(cache, "the cat sat", 8, 0.0, "ddtree", 8, "fp32", "same", exact=False))
    assert not cache.get("fp32", "same").exact
    final = list(app_module.compare(cache, "the cat sat", 8, 0.0, "ddtree", 8, "fp32", "same", exact=True))[-1]
    assert cache.get("fp32", "same").exact and "identical" in final[4]
    final = list(app_module.compare(cache, "the cat sat", 8, 0.0, "ddtree", 8, "int8", "same", exact=True))[-1]
    assert "exact mode is off in int8" in final[7] and "outlier" in final[7]


def test_served_app_streams_and_matches(served):
    from gradio_client import Client

    url, _ = served
    client = Client(url, verbose=False)
    job = client.submit("the cat sat", 24, 0.0, "dflash", 8, "fp32", "same", True, api_name="/compare")
    final = job.result(timeout=300)
    assert len(job.outputs()) > 2  # streamed, not one final update
    assert final[0] == final[2] and "identical" in final[4]
    bad = client.submit("   ", 8, 0.0, "ddtree", 8, "fp32", "same", True, api_name="/compare")
    with pytest.raises(Exception, match="empty"):
        bad.result(timeout=120)


def test_page_renders_in_chromium(served, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("Chromium not installed on this machine (apt-get install chromium)")
    url, _ = served
    shot = tmp_path / "app.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--window-size=1400,1100", "--virtual-time-budget=15000", f"--screenshot={shot}", url]
    subprocess.run(cmd, capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000
    docs = ROOT / "docs"
    if os.environ.get("QUANTTREE_SAVE_SCREENSHOT"):
        docs.mkdir(exist_ok=True)
        shutil.copy(shot, docs / "app.png")


def test_app_defaults_to_the_engines_default_method_and_its_budget(app_module, tiny_dirs):
    from quanttree.engine import DEFAULT_BUDGET, DEFAULT_CAP, default_budget

    assert default_budget("auto") == DEFAULT_CAP and default_budget("ddtree") == DEFAULT_BUDGET
    cache = app_module.EngineCache(str(tiny_dirs["llama"]), str(tiny_dirs["llama-drafter"]), "cpu")
    demo = app_module.build_app(cache)
    values = {getattr(b, "label", None): getattr(b, "value", None) for b in demo.blocks.values()}
    assert values["speculative method"] == "auto" and values["tree budget / cap"] == DEFAULT_CAP
    demo.close()
