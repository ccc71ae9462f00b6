"""The Prefect UI in a real browser: a demo run against a real server shows one task run per
stage and the stage artifacts on its flow run page. Screenshots go to test-output/ui/.

Needs Debian's chromium (/usr/bin/chromium) and the `playwright` package (dev extra; its own
browser download is not used). With SIT_REQUIRE_BROWSER=1 (CI) a missing chromium is installed
with apt-get, and anything still missing fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sit_cli.server import REPO_ROOT, background_server
from conftest import HANG_GUARD_S

pytestmark = pytest.mark.slow

OVERRIDES = ["generation.num_samples=4", "filter.target_count=2", "filter.min_count=1", "preference.num_pairs=1",
             "generation.instruction_max_tokens=40", "generation.response_max_tokens=40", "filter.length.min=3",
             "generation.batch_size=4"]
OUTPUT_DIR = REPO_ROOT / "test-output" / "ui"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

RUN_FLOW = textwrap.dedent("""
    import json, sys
    from sit_prefect.flows import synthetic_instruction_tuner
    state = synthetic_instruction_tuner(run_dir=sys.argv[1], preset="demo", profile="cpu", overrides=sys.argv[2:],
                                        stages=["generate", "filter"], return_state=True)
    print("RESULT " + json.dumps({"id": str(state.state_details.flow_run_id), "state": state.type.value}))
""")


def browser_path() -> str:
    """/usr/bin/chromium, installed here if CI requires the browser test and it is missing."""
    required = os.environ.get("SIT_REQUIRE_BROWSER") == "1"
    if shutil.which("chromium") is None and required and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which("chromium")
    if path is None:
        if required:
            pytest.fail("SIT_REQUIRE_BROWSER=1 but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium); set SIT_REQUIRE_BROWSER=1 to require it")
    try:
        import playwright  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("SIT_REQUIRE_BROWSER=1 but the playwright package is missing (scripts/install.sh --dev)")
        pytest.skip("the playwright package is missing (scripts/install.sh --dev)")
    return path


def test_flow_run_page_lists_stage_task_runs_and_artifacts(tmp_path, smollm2_path):
    chromium = browser_path()
    from playwright.sync_api import expect, sync_playwright

    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    with background_server(tmp_path / "prefect-home") as (url, env):
        proc = subprocess.run([sys.executable, "-c", RUN_FLOW, str(tmp_path / "run"), *OVERRIDES], env=env,
                              capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
        assert run["state"] == "COMPLETED"

        with sync_playwright() as pw:
            # A persistent context is how Playwright takes a fresh --user-data-dir of our choosing.
            browser = pw.chromium.launch_persistent_context(tmp_path / "chromium", executable_path=chromium,
                                                            args=CHROMIUM_ARGS, headless=True,
                                                            viewport={"width": 1400, "height": 1000})
            page = browser.new_page()
            page.goto(f"{url}/runs/flow-run/{run['id']}")
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=60_000)

            page.get_by_text("Task Runs", exact=True).click()
            for stage in ("generate", "filter"):
                expect(page.get_by_text(stage, exact=True).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(OUTPUT_DIR / "flow_run.png"), full_page=True)

            page.get_by_text("Artifacts", exact=True).click()
            # The progress artifact of each stage and the filter's rule table.
            for key in ("generate-progress", "filter-progress", "filter-rule-statistics"):
                expect(page.get_by_text(key).first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(OUTPUT_DIR / "flow_run_artifacts.png"), full_page=True)
            browser.close()
