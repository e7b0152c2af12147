"""The daemon's web page in a real browser (Debian's headless chromium, driven by playwright)
against three live daemons: the ring, a streamed chat answer, a node that dies."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster

KEY = "the-page-s-api-key"
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium in a closed network: no background calls home (they fail, slowly), no sandbox as root.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("page")
    (root / "key").write_text(KEY)
    c = Cluster(root, 3, EXACT_RING, per_node={0: ["--api-key-file", str(root / "key")]})
    yield c
    c.stop()


@pytest.fixture()
def page():  # noqa: ANN201
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert not errors, errors


def cards(page: Page) -> dict[str, str]:
    """Node name -> the layer range its card shows."""
    out = {}
    for card in page.query_selector_all(".node-card"):
        name = card.query_selector(".name").inner_text().replace(" (this node)", "")
        out[name] = card.query_selector(".layers").inner_text()
    return out


def test_the_page_shows_the_ring_streams_a_chat_and_drops_a_dead_node(cluster, page):  # noqa: ANN001
    node = cluster.nodes[0]
    page.goto(f"{node.api}/")
    page.wait_for_selector("#key-form:not([hidden])")  # this daemon wants a key: asked once
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("document.querySelectorAll('.node-card').length === 3")
    status = node.status()
    want = {
        n["name"]: f"layers {n['layers'][0]}–{n['layers'][1]} of {status['n_layers']}"
        for n in status["nodes"]
    }
    assert cards(page) == want and len(want) == 3
    assert page.inner_text("#plan") == f"plan epoch {status['epoch']}"
    assert status["model_summary"] == "llama · 135M parameters"  # the default SmolLM2 GGUF
    model = f"{status['model']} · {status['model_summary']} · {status['n_layers']} layers"
    assert page.inner_text("#model") == model
    assert len(page.query_selector_all("#ring circle.node")) == 3
    assert page.evaluate("localStorage.getItem('ringinfer.apiKey')") == KEY

    # A chat message: the answer grows piece by piece, and is what --local answers.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const m = document.querySelector('.message.assistant');
            if (m) window.lengths.push(m.textContent.length);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".message.assistant[data-done=true]", timeout=60_000)
    local = run_cli("generate", "--local", "--json", "--chat", "--max-tokens", "256",
                    "What is the capital of France?")  # fmt: skip
    assert page.inner_text(".message.assistant") == json.loads(local.stdout)["text"]
    growing = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(growing)) > 3, growing  # streamed, not shown at once
    assert "time to first token" in page.inner_text("#chat-stats")
    assert "tokens/s" in page.inner_text("#chat-stats")
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "web-page.png"))

    # A node dies: the page drops it within the dead bound (6 s, checked every heartbeat).
    dead = cluster.nodes[2]
    killed = time.monotonic()
    dead.stop(signal.SIGKILL)
    page.wait_for_function(
        "document.querySelectorAll('.node-card').length === 2", timeout=20_000
    )
    gone_after = time.monotonic() - killed
    assert dead.name not in cards(page)
    assert gone_after < 6 + 2 * 1 + 1, gone_after  # dead bound, two heartbeats, the stream
    page.screenshot(path=str(OUTPUT / "web-page-node-gone.png"))

    # ... and shows the re-plan over the two left once it is live.
    epoch = status["epoch"]
    page.wait_for_function(
        f"/^plan epoch (\\d+)$/.test(document.getElementById('plan').textContent) && "
        f"Number(document.getElementById('plan').textContent.split(' ')[2]) > {epoch}",
        timeout=60_000,
    )
    status = node.status()
    want = {
        n["name"]: f"layers {n['layers'][0]}–{n['layers'][1]} of {status['n_layers']}"
        for n in status["nodes"]
    }
    page.wait_for_function("[...document.querySelectorAll('.node-card .layers')].every("
                           "e => e.textContent.startsWith('layers '))")  # fmt: skip
    assert cards(page) == want and len(want) == 2
