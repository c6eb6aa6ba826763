"""The page at / of the token-reward API, in a real headless Chromium, against a real Ray Serve (auth on).

The browser is driven over the Chrome DevTools Protocol (CDP): Chromium listens on a 127.0.0.1 port
(`--remote-debugging-port=0`, the port read back from DevToolsActivePort) and the test talks to its page
over a websocket with the `websockets` package (the dev extra). Typing goes through Input.insertText,
clicks and hovers through Input.dispatchMouseEvent, so the page sees real input events. Nothing is
downloaded: the browser is the system's Chromium (Debian: apt-get install chromium).

What is checked: every drawn token's data-* numbers and colour/sign against the JSON API's answer for the
same input; hover and keyboard focus show p and the reward; a 401 (no key, wrong key) and a 422 (empty
response) end as readable messages; the key never reaches storage, cookies or the URL; the page fits a
375 px phone screen. Screenshots go to $TLCR_TEST_ARTIFACTS (default tests/artifacts/, git-ignored).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
import torch

from tlcr_ray.config import load_config
from tlcr_ray.models import TokenDiscriminator, save_head_model
from tlcr_ray.rl.rendezvous import free_port
from tlcr_ray.testing.browser import DESKTOP, Chromium, Page, find_chromium

REPO = Path(__file__).resolve().parents[2]
API_KEY = "ui-test-key-41c7"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ITEMS = [
    {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:",
     "response": " Mix flour, water, salt and yeast.\nKnead, let it rise, then bake it."},
    {"prompt": "", "response": "Sure 🎉 — ünïcödé ok?"},
    {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " Hello!"},
]


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (looked for $TLCR_CHROMIUM, chromium, "
                                                 "chromium-browser, google-chrome): apt-get install chromium"),
]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def artifacts(request) -> Path:
    folder = Path(os.environ.get("TLCR_TEST_ARTIFACTS") or REPO / "tests" / "artifacts") / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():  # shown even when output is captured
            print(f"\nUI screenshots: {folder}", flush=True)
    return folder


@pytest.fixture(scope="module")
def url(ray_local, tiny_model_dir, tokenizer, tmp_path_factory):
    """The real Serve app on 127.0.0.1 with bearer auth on; its discriminator's p spreads over (0, 1)."""
    from ray import serve

    from serve.app import build_application

    model = TokenDiscriminator.from_pretrained(tiny_model_dir, seed=0)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=0.2)
    disc_dir = save_head_model(model, tmp_path_factory.mktemp("disc") / "model", tokenizer=tokenizer)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(load_config(None), str(disc_dir), ingress_env={"TLCR_API_KEY": API_KEY}),
              name="tlcr-ui", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    from websockets.sync.client import connect

    chromium = Chromium(CHROMIUM)
    try:
        with connect(chromium.page_ws_url(), max_size=None, open_timeout=30) as ws:
            page = Page(ws)
            for domain in ("Page", "Runtime", "Log"):
                page.send(f"{domain}.enable")
            page.viewport(*DESKTOP)
            yield page
    finally:
        chromium.close()


@pytest.fixture
def page(browser, url):
    browser.open(url + "/")
    yield browser
    assert browser.errors() == [], "the page logged errors"


# ---------------------------------------------------------------- helpers

def enter_items(page: Page, items: list[dict]) -> None:
    while page.js("document.querySelectorAll('#items .item').length") < len(items):
        page.click("#add-item")
    for i, item in enumerate(items):
        page.fill("#items .prompt", item["prompt"], i)
        page.fill("#items .response", item["response"], i)


def set_mode(page: Page, mode: str) -> None:
    page.js(f"(() => {{ const s = document.querySelector('#mode'); s.value = {json.dumps(mode)}; "
            "s.dispatchEvent(new Event('change')); })()")


def submit(page: Page, expect_items: int | None = None) -> None:
    page.click("#score")
    done = "!document.querySelector('#error').hidden"
    if expect_items is not None:
        done += f" || document.querySelectorAll('#result-list .result').length === {expect_items}"
    page.wait_for(f"!document.querySelector('#score').disabled && ({done})", timeout=120, what="the scoring answer")


def drawn(page: Page) -> list[dict]:
    """What the page drew: per item its data-* numbers, and per token its data-*, class and computed style."""
    return page.js("""[...document.querySelectorAll('#result-list .result')].map(box => ({
        ...box.dataset,
        stats: box.querySelector('.stats').textContent,
        text: box.querySelector('.seq').textContent,
        tokens: [...box.querySelectorAll('.seq .tok')].map(el => {
            const st = getComputedStyle(el);
            return {...el.dataset, cls: el.className, shown: el.textContent,
                    background: st.backgroundColor, pattern: st.backgroundImage,
                    underline: st.borderBottomStyle};
        }),
    }))""")


def error_text(page: Page) -> str:
    return page.js("document.querySelector('#error').hidden ? '' : document.querySelector('#error').innerText")


def signed(x: float) -> str:
    return ("+" if x > 0 else "−" if x < 0 else "") + f"{abs(x):.4f}"


def rgba(css: str) -> tuple[float, ...]:
    inside = css[css.index("(") + 1: css.index(")")]
    values = tuple(float(v) for v in inside.replace("/", ",").split(","))
    return values if len(values) == 4 else (*values, 1.0)


# ---------------------------------------------------------------- tests

def test_the_page_and_its_assets_need_no_key(url):
    index = requests.get(url + "/", timeout=60)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in index.headers["content-security-policy"]
    assert requests.get(url + "/ui", timeout=60).text == index.text
    for asset, kind in (("/ui.js", "text/javascript"), ("/ui.css", "text/css")):
        reply = requests.get(url + asset, timeout=60)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind)
    for ref in ('src="ui.js"', 'href="ui.css"', 'href="docs"'):
        assert ref in index.text
    assert "http://" not in index.text and "https://" not in index.text, "no external assets"
    assert requests.post(url + "/v1/token-rewards", json={"items": ITEMS[:1]}, timeout=60).status_code == 401
    assert not {"/", "/ui", "/ui.js", "/ui.css"} & set(requests.get(url + "/openapi.json", timeout=60).json()["paths"])


@pytest.mark.parametrize("mode", ["continuous", "fixed"])
def test_drawn_tokens_match_the_api(page, url, artifacts, mode):
    page.fill("#api-key", API_KEY)
    enter_items(page, ITEMS)
    set_mode(page, mode)
    submit(page, expect_items=len(ITEMS))
    assert error_text(page) == ""
    got = drawn(page)
    reply = requests.post(url + "/v1/token-rewards", json={"items": ITEMS, "mode": mode}, headers=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    want = reply.json()["items"]
    assert len(got) == len(want) == len(ITEMS)
    signs = set()
    for item, box, api in zip(ITEMS, got, want):
        assert int(box["count"]) == len(box["tokens"]) == len(api["tokens"]) > 0
        assert float(box["sum"]) == pytest.approx(api["sum"], abs=1e-5)
        assert float(box["mean"]) == pytest.approx(api["mean"], abs=1e-5)
        assert signed(float(box["sum"])) in box["stats"] and signed(float(box["mean"])) in box["stats"]
        # The drawn text is the response itself (newline/tab markers aside), byte pieces drawn once, then
        # the end-of-sequence token the API scores every finished response with, labelled.
        last = api["tokens"][-1]
        ends = last["text"] == "" and last["start"] == len(item["response"])
        assert ends and box["text"].endswith("⟨end⟩")
        text = box["text"].removesuffix("⟨end⟩")
        assert text.replace("↵\n", "\n").replace("⇥\t", "\t") == item["response"]
        drawn_to = 0  # code points of the response drawn so far: each token draws its new characters
        for k, (tok, t) in enumerate(zip(box["tokens"], api["tokens"])):
            assert int(tok["index"]) == k
            assert (int(tok["id"]), tok["text"], int(tok["start"]), int(tok["end"])) == \
                (t["id"], t["text"], t["start"], t["end"])
            new = item["response"][max(t["start"], drawn_to): t["end"]]
            eos = k == len(api["tokens"]) - 1 and ends
            assert tok["shown"].replace("↵\n", "\n").replace("⇥\t", "\t") == ("⟨end⟩" if eos else new), (k, tok, t)
            assert ("eos" in tok["cls"].split()) == eos
            assert ("piece" in tok["cls"].split()) == (new == "" and not eos), "byte pieces of a character draw no text"
            drawn_to = max(drawn_to, t["end"])
            p, r = float(tok["p"]), float(tok["reward"])
            assert p == pytest.approx(t["p"], abs=1e-5) and r == pytest.approx(t["reward"], abs=1e-5)
            sign = "+" if r > 0 else "-" if r < 0 else "0"
            if abs(t["reward"]) > 1e-5:
                assert sign == ("+" if t["reward"] > 0 else "-")
            kind = {"+": "pos", "-": "neg", "0": "zero"}[sign]
            assert tok["sign"] == sign and kind in tok["cls"].split(), tok
            signs.add(sign)
            # Colour: red/green at alpha 0.85·|r| (as the report's heat-map) ...
            red, green, blue, alpha = rgba(tok["background"])
            if sign == "0":
                assert alpha == 0
            else:
                assert (red, green, blue) == ((22, 163, 74) if sign == "+" else (220, 38, 38))
                assert alpha == pytest.approx(min(1.0, abs(r)) * 0.85, abs=0.01)
            # ... and not colour alone: negatives are striped with a dashed underline, positives solid.
            if sign == "-":
                assert "repeating-linear-gradient" in tok["pattern"] and tok["underline"] == "dashed"
            elif sign == "+":
                assert tok["pattern"] == "none" and tok["underline"] == "solid"
    assert {"+", "-"} <= signs, "the test model should give both signs"
    if mode == "fixed":
        assert all(float(t["reward"]) in (-1.0, 0.0, 1.0) for box in got for t in box["tokens"])

    # Hover shows the token's characters, p and reward; arrow keys move the focus to the next token.
    first = got[0]["tokens"]
    page.hover("#result-list .result .tok", 2)
    shown = page.js("document.querySelector('#result-list .result .inspector').textContent")
    assert f"p = {float(first[2]['p']):.4f}" in shown and signed(float(first[2]["reward"])) in shown
    assert json.dumps(first[2]["text"]) in shown and "#3" in shown
    page.click("#result-list .result .tok", 0)
    page.key("ArrowRight", 39)
    assert page.js("document.activeElement.dataset.index") == "1"
    shown = page.js("document.querySelector('#result-list .result .inspector').textContent")
    assert f"p = {float(first[1]['p']):.4f}" in shown and "#2" in shown

    page.js("document.querySelector('#show-marks').click()")
    marker = page.js("getComputedStyle(document.querySelector('#result-list .tok.neg'), '::after').content")
    assert marker == '"▼"'
    desktop = page.screenshot(artifacts / f"tokens-{mode}-1200px.png", DESKTOP[0])
    phone = page.screenshot(artifacts / f"tokens-{mode}-375px.png", 375, scale=2, mobile=True)
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000


def test_page_fits_a_phone(page):
    page.viewport(375, 812, 2, mobile=True)
    try:
        assert page.js("document.documentElement.scrollWidth") <= 375
        assert page.js("document.querySelector('#score').getBoundingClientRect().right") <= 375
    finally:
        page.viewport(*DESKTOP)


def test_no_key_and_a_wrong_key_are_readable_401s(page, artifacts):
    assert "requires an API key" in page.js("document.querySelector('#model-info').textContent")
    submit(page)
    message = error_text(page)
    assert "Not authorised (401)" in message and "missing or wrong bearer token" in message
    assert "enter it in “API key”" in message
    assert page.js("document.querySelector('#results').hidden") is True
    page.screenshot(artifacts / "error-401-375px.png", 375, scale=2, mobile=True)
    page.fill("#api-key", "not-the-key")
    submit(page)
    message = error_text(page)
    assert "Not authorised (401)" in message and "was not accepted" in message and "not-the-key" not in message


def test_an_empty_response_is_a_readable_422_at_its_field(page, artifacts):
    page.fill("#api-key", API_KEY)
    page.fill("#items .response", "")
    submit(page)
    message = error_text(page)
    assert "rejected (422)" in message and "items.0.response: String should have at least 1 character" in message
    field = page.js("(() => { const p = document.querySelector('#items .field-error[data-for=response]'); "
                    "return p.hidden ? null : p.textContent; })()")
    assert field == "String should have at least 1 character"
    assert page.js("document.querySelector('#items .response').getAttribute('aria-invalid')") == "true"
    page.screenshot(artifacts / "error-422-1200px.png", DESKTOP[0])
    # Fixing the field and scoring again clears the message.
    page.fill("#items .response", " Better.")
    submit(page, expect_items=1)
    assert error_text(page) == ""
    assert page.js("document.querySelector('#items .response').hasAttribute('aria-invalid')") is False


def test_the_key_stays_in_page_memory(page, url):
    page.fill("#api-key", API_KEY)
    submit(page, expect_items=1)
    assert page.js("localStorage.length + sessionStorage.length") == 0
    assert page.js("document.cookie") == "" and API_KEY not in page.js("location.href")
    page.open(url + "/ui")  # a reload forgets it
    assert page.js("document.querySelector('#api-key').value") == ""
