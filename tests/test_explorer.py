"""The explorer in a real browser: headless Chromium (Debian's, driven by Playwright) loads the page served
by `tracin-index serve`, types a triple, waits for the chart and checks its labels and values against the API."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from test_index import run_ids

from tracin_index.index import GradientIndex

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

BROWSER = os.environ.get("TRACIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    import httpx
    import uvicorn

    from tracin_index.serve.app import create_app

    index = GradientIndex.build(tmp_path_factory.mktemp("explorer") / "index", model_path=tiny_run, sketch_dim=16,
                                device="cpu")  # fmt: skip
    port = free_port()
    config = uvicorn.Config(create_app(index), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/api/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield index, url
    running.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium found (apt-get install chromium, or set TRACIN_CHROMIUM)")
def test_the_explorer_draws_the_apis_exact_influences(server, tiny_run, tmp_path):
    import httpx

    index, url = server
    _, _, test = run_ids(tiny_run)
    h, r, t = (int(x) for x in test[0])
    head, relation, tail = index.entity_labels[h], index.relation_labels[r], index.entity_labels[t]
    expected = httpx.get(url + "/api/query", params={"head": head, "relation": relation, "tail": tail, "top_k": 10},
                         timeout=60).json()["results"][0]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('health').textContent.includes('training facts')")
        page.fill("#head", head)
        page.fill("#relation", relation)
        page.fill("#tail", tail)
        page.click("#explain-button")
        page.wait_for_selector("#chart .bar")
        bars = page.eval_on_selector_all(
            "#chart .bar", "els => els.map(e => [e.dataset.trainIndex, e.dataset.label, Number(e.dataset.influence), e.classList.contains('pro')])")
        want = [[str(i["train_index"]), f"{i['head']} {i['relation']} {i['tail']}", i["influence"], True] for i in expected["proponents"]]
        want += [[str(i["train_index"]), f"{i['head']} {i['relation']} {i['tail']}", i["influence"], False] for i in expected["opponents"]]
        assert bars == want
        assert page.text_content("#result-title") == f"({head}, {relation}, {tail})"
        # the graph: the prediction's entities outlined; a click lists an entity's training facts
        shared = page.eval_on_selector_all("#graph .node.shared", "els => els.map(e => e.dataset.entity)")
        assert sorted(shared) == sorted({head, tail})
        page.click(f"#graph .node[data-entity='{head}']")
        page.wait_for_selector("#facts:not([hidden]) tbody tr")
        assert head in page.text_content("#facts-title")
        screenshot = Path(os.environ.get("TRACIN_EXPLORER_SCREENSHOT") or tmp_path / "explorer.png")
        page.screenshot(path=str(screenshot), full_page=True)
        # the self-influence tab
        page.click("#tab-self")
        page.wait_for_selector("#self-table tbody tr")
        first_row = page.eval_on_selector("#self-table tbody tr td:nth-child(2)", "e => e.textContent")
        assert int(first_row) == index.self_influence(1)[0].train_index
        browser.close()
    assert not errors
    assert screenshot.stat().st_size > 10_000
