"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against a running 2-rank cluster with an API key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import start_cluster
from playwright import sync_api  # the 'test' extra; it drives Debian's chromium, never its own download

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
KEY = "browser-secret"
# Root in a closed network: no sandbox, no GPU, and no background connections (refused here).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("MJC_DASHBOARD_SCREENSHOT")  # e.g. docs/dashboard.png to refresh the docs

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} is missing (scripts/system-deps.sh --test installs Debian's chromium)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    c = start_cluster(
        tiny_llama,
        2,
        tmp_path_factory.mktemp("dash"),
        api_key=KEY,
        args=("--probe-latency-interval", "1", "--probe-bandwidth-interval", "2", "--probe-bandwidth-bytes", "262144"),
    )
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            page = context.new_page()
            page.problems = []
            page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
            page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
            yield page
        finally:
            context.close()


def test_dashboard_in_chromium(cluster, page, tmp_path):
    expect = sync_api.expect
    page.goto(cluster.url("/dashboard"))

    # the page asks for the key, then shows the cluster
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    expect(page.locator("#status")).to_have_text("ready")
    for rank in (0, 1):
        node = page.locator(f'#topology [data-rank="{rank}"]')
        expect(node).to_have_attribute("data-state", "up")
        expect(node).to_contain_text("127.0.0.1:")  # its ring address from the hostfile
        expect(node).to_contain_text("RSS")
    expect(page.locator("#link-latency")).not_to_have_text("–", timeout=15_000)
    expect(page.locator("#link-bandwidth")).to_contain_text("B/s", timeout=15_000)
    requests_before = page.locator("#requests tbody tr").count()
    probes_before = int(page.inner_text("#link-probes"))

    # a chat message streams the cluster's answer (the same text the API gives)
    body = {
        "model": cluster.model_id,
        "messages": [{"role": "user", "content": "Tell me about foxes"}],
        "max_tokens": 48,
        "temperature": 0,
    }
    expected = httpx.post(cluster.url("/v1/chat/completions"), json=body, headers=cluster.headers(), timeout=60).json()[
        "choices"
    ][0]["message"]["content"]
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-input", "Tell me about foxes")
    page.click("#chat-send")
    answer = page.locator("#chat-log .assistant").last
    expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
    assert answer.text_content() == expected
    assert int(answer.get_attribute("data-chunks")) > 1, "the answer came in one piece, not streamed"

    # live numbers move after the requests
    expect(page.locator("#requests tbody tr")).to_have_count(requests_before + 2, timeout=10_000)
    expect(page.locator("#requests tbody tr").first).to_contain_text("/v1/chat/completions")
    page.wait_for_function(
        "document.getElementById('sparkline-caption').textContent.indexOf('(peak 0)') < 0", timeout=10_000
    )
    page.wait_for_function(
        f"Number(document.getElementById('link-probes').textContent) > {probes_before}", timeout=15_000
    )

    assert not page.problems, page.problems

    # an error shows in the chat box and the error table
    page.fill("#chat-max-tokens", "100000000")
    page.fill("#chat-input", "too long")
    page.click("#chat-send")
    expect(page.locator("#chat-log .error").last).to_contain_text("max_tokens", timeout=10_000)
    expect(page.locator("#errors tbody tr").first).to_contain_text("max_tokens", timeout=10_000)

    # and go back to idle: nothing in flight, nothing in the batch
    expect(page.locator("#inflight")).to_have_text("0", timeout=10_000)
    expect(page.locator("#batch-size")).to_have_text("0")

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    if SCREENSHOT:
        shutil.copy(shot, SCREENSHOT)
    # Chromium logs the deliberate 400 response itself; nothing else may appear
    assert len(page.problems) == 1 and "400 (Bad Request)" in page.problems[0], page.problems


def test_a_wrong_key_is_refused_in_the_page(cluster, page):
    expect = sync_api.expect
    page.goto(cluster.url("/dashboard"))
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button")
    expect(page.locator("#key-message")).to_contain_text("refused")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.locator("#topology [data-rank]").count() == 0  # nothing shown without the key
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    expect(page.locator('#topology [data-rank="1"]')).to_have_attribute("data-state", "up")
