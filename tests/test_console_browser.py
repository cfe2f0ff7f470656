"""The console in a real browser (Debian's headless Chromium driven by Playwright) against
`ondo serve --telemetry sim` on the CPU with the embedded model: the overview's charts gain
points; a scripted incident (a TPOT objective no request can meet) makes the agent's
recommendation appear; a viewer's approval is refused with 403 and the page says so; an
operator approves it and the governor's limits change; the audit shows the entry; an
operator's own proposal cannot be approved by them and another operator rejects it with a
reason; the live stream, cut every two seconds, resumes without losing or repeating an entry.
Screenshots go to $ONDO_ARTIFACTS/console (default test-artifacts/console)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from ondo.console.auth import TokenStore
from ondo.events.verify import verify
from tests.server_process import launch_server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ONDO_ARTIFACTS", "test-artifacts")) / "console"
SERVER = ("--device", "cpu", "--max-model-len", "256", "--num-kv-blocks", "64",
          "--telemetry", "sim", "--agent-interval-s", "0", "--console-outcome-s", "3",
          # the scripted incident: no request meets this TPOT, the first one opens it
          "--slo-tpot-s", "0.000001", "--detector", "slo_min_violations=1",
          # a slow start on a shared CPU must not read as a telemetry gap
          "--detector", "gap_min_s=5")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed (scripts/install.sh)")


def _login(browser, base: str, token: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(f"{base}/console/login")
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    page.wait_for_url(f"{base}/console/")
    return page


def _points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


@pytest.mark.slow
def test_the_console_in_a_browser(tmp_path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    db = tmp_path / "ondo.db"
    tokens = TokenStore(db)
    viewer = tokens.create("viewer", "val")[0]
    alice = tokens.create("operator", "alice")[0]
    bob = tokens.create("operator", "bob")[0]
    proc, base = launch_server(*SERVER, "--telemetry-db", str(db))
    api = f"{base}/console/api"
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = _login(browser, base, alice)
            # The overview's charts gain points from the live stream.
            page.wait_for_function("document.querySelector('#chart-temp').dataset.points > 0",
                                   timeout=30_000)
            before = _points(page, "chart-temp")
            page.wait_for_function(
                f"document.querySelector('#chart-temp').dataset.points > {before + 2}",
                timeout=30_000)
            assert _points(page, "chart-power") > before

            # The scripted incident: one request, and the agent recommends.
            r = httpx.post(f"{base}/v1/completions", timeout=120,
                           json={"prompt": "The GPU is", "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200
            page.goto(f"{base}/console/recommendations")
            row = page.wait_for_selector("tr[data-action=set_token_budget]",
                                         timeout=240_000)  # the first loads the embedder
            rid = row.get_attribute("data-id")
            assert row.get_attribute("data-status") == "pending"
            page.screenshot(path=str(ARTIFACTS / "recommendations.png"), full_page=True)

            # A viewer's approval is refused, and the page says so.
            vpage = _login(browser, base, viewer)
            vpage.goto(f"{base}/console/recommendations/{rid}")
            vpage.click("#approve")
            vpage.wait_for_selector("#decision-message.error")
            said = vpage.inner_text("#decision-message")
            assert said.startswith("403") and "viewer role cannot approve" in said
            vpage.screenshot(path=str(ARTIFACTS / "viewer_refused.png"), full_page=True)

            # The operator approves: the governor's limits change.
            page.goto(f"{base}/console/recommendations/{rid}")
            page.fill("#approve-form input[name=comment]", "shorter prefill chunks")
            page.click("#approve")
            page.wait_for_selector("#decision-message.ok")
            assert "applied as act-" in page.inner_text("#decision-message")
            gov = httpx.get(f"{api}/governor", headers={"Authorization": f"Bearer {alice}"},
                            timeout=10).json()
            assert gov["caps"]["max_num_batched_tokens"] == 16
            assert gov["limits"]["max_num_batched_tokens"] == 16
            page.wait_for_selector("#outcome", timeout=30_000)  # after --console-outcome-s
            page.screenshot(path=str(ARTIFACTS / "approved.png"), full_page=True)
            page.goto(f"{base}/console/")
            page.wait_for_selector("#governor >> text=operator cap max_num_batched_tokens")
            page.wait_for_function("document.querySelector('#chart-temp').dataset.points > 5")
            page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)

            # Alice's own proposal: she cannot approve it; Bob rejects it with a reason.
            page.goto(f"{base}/console/recommendations")
            page.select_option("#propose-form select[name=action]", "set_governor_policy")
            page.fill("#propose-form input[name=params]", '{"policy": "predictive"}')
            page.fill("#propose-form input[name=rationale]", "forecast before the afternoon")
            page.click("#propose-form button")
            page.wait_for_selector("#propose-message.ok")
            mine = page.inner_text("#propose-message").split()[-1]
            page.goto(f"{base}/console/recommendations/{mine}")
            page.click("#approve")
            page.wait_for_selector("#decision-message.error")
            assert "another operator must approve" in page.inner_text("#decision-message")
            bpage = _login(browser, base, bob)
            bpage.goto(f"{base}/console/recommendations/{mine}")
            bpage.fill("#reject-form input[name=reason]", "the load is light today")
            bpage.click("#reject")
            bpage.wait_for_selector("#rec-status >> text=rejected")
            gov = httpx.get(f"{api}/governor", headers={"Authorization": f"Bearer {bob}"},
                            timeout=10).json()
            assert gov["policy"] == "off"

            # The audit shows both decisions and a verified chain.
            bpage.goto(f"{base}/console/audit")
            bpage.wait_for_selector(f"#decisions tr[data-id='{rid}'][data-decision=approve]")
            assert bpage.get_attribute(f"#decisions tr[data-id='{rid}'][data-decision=approve]",
                                       "data-operator") == "alice"
            rej = bpage.inner_text(f"#decisions tr[data-id='{mine}'][data-decision=reject]")
            assert "bob" in rej and "the load is light today" in rej
            assert bpage.inner_text("#chain-status").startswith("verified")
            bpage.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)

            # The stream, cut every 2 s, resumes from Last-Event-ID: no entry lost or repeated.
            spage = _login(browser, base, viewer)
            spage.goto(f"{base}/console/events?reconnect_s=2")
            spage.wait_for_function("window.ondo.opens >= 1")
            for i in range(8):
                r = httpx.post(f"{api}/proposals", timeout=10,
                               headers={"Authorization": f"Bearer {bob}"},
                               json={"action": "no_action", "rationale": f"stream check {i}"})
                assert r.status_code == 200
                time.sleep(1.0)
            head = httpx.get(f"{api}/events?limit=1", timeout=10,
                             headers={"Authorization": f"Bearer {bob}"}).json()["head_seq"]
            spage.wait_for_function(f"window.ondo.seen.length && "
                                    f"window.ondo.seen[window.ondo.seen.length - 1] >= {head}",
                                    timeout=20_000)
            seen = spage.evaluate("window.ondo.seen")
            assert spage.evaluate("window.ondo.opens") >= 2  # it reconnected, entries came on
            assert seen == list(range(seen[0], seen[-1] + 1)), seen  # none lost, none twice
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    assert verify(db).ok
