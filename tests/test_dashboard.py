"""The dashboard in a real browser: Debian's chromium, headless, driven through chromedriver.

One real server (with a training worker) holds a model with two versions, a finished job and a
running one; the page must list them as the API does, draw one point per finished epoch, and a
promote clicked on the page must change what `/v1` serves. A screenshot of that known state is
kept (`BNSERVE_TEST_ARTIFACTS`, default `test-artifacts/`) and checked to be more than blank.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    AUTH,
    REPO,
    TOKEN,
    ServerProcess,
    create_model,
    pt_bytes,
    trained_state_dict,
    upload,
)
from tests.helpers_api import running
from tests.helpers_jobs import FAST_WORKER_ENV, blobs, dataset_id, start_job, wait_job, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("BNSERVE_TEST_REQUIRE_BROWSER") == "1"
if not (CHROMIUM and CHROMEDRIVER):
    if REQUIRED:
        raise RuntimeError("BNSERVE_TEST_REQUIRE_BROWSER=1 but chromium/chromedriver are missing")
    pytest.skip(
        "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
        ".ci/run installs them)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("BNSERVE_TEST_ARTIFACTS", REPO / "test-artifacts"))
FINISHED_EPOCHS = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Model `ui` (uploads 1 and 2, 2 serving; 3 from the finished job), a running job too."""
    server = ServerProcess(
        tmp_path_factory.mktemp("ui"), {"BNSERVE_WORKERS": "1", **FAST_WORKER_ENV}
    ).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            create_model(client, "ui", "mlp_bn")
            for seed in (1, 2):
                r = upload(client, "ui", pt_bytes(trained_state_dict("mlp_bn", seed)))
                assert r.status_code == 201, r.text
            x, y = blobs(256)
            data = dataset_id(client, x, y, "blobs")
            finished = start_job(
                client,
                model="ui",
                dataset=data,
                epochs=FINISHED_EPOCHS,
                batch_size=32,
                lr=0.05,
                seed=0,
                promote="never",
            )
            assert wait_job(client, finished, timeout=120)["status"] == "succeeded"
            big_x, big_y = blobs(20000, seed=1)
            running = start_job(
                client,
                model="ui",
                dataset=dataset_id(client, big_x, big_y, "big"),
                epochs=1000,
                batch_size=8,
                lr=0.01,
                seed=0,
                promote="never",
            )
            wait_job(client, running, statuses=("running",), timeout=120)
            yield {"url": server.url, "client": client, "finished": finished, "running": running}
            client.post(f"/v1/jobs/{running}/cancel", headers=AUTH)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1600",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, condition: Any, what: str, timeout: float = 30) -> Any:
    """`condition` until truthy; a row the 2 s poll re-rendered meanwhile is looked up again."""
    wait = WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(condition, message=f"waiting for {what}")


def _text(driver: WebDriver, css: str) -> str:
    return str(_wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).text or " ", css))


def _click(driver: WebDriver, css: str) -> None:
    def click(d: WebDriver) -> bool:
        element = d.find_element(By.CSS_SELECTOR, css)
        if not element.is_enabled():
            return False
        element.click()
        return True

    _wait(driver, click, f"a click on {css}")


def _open(browser: WebDriver, url: str) -> None:
    browser.get(url + "/ui/")
    _wait(
        browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"), "load"
    )


def _circles(browser: WebDriver, chart: str, series: str) -> int:
    return len(browser.find_elements(By.CSS_SELECTOR, f"#{chart} circle[data-series={series}]"))


def test_the_page_is_served_from_the_package_with_a_strict_policy(stack: dict[str, Any]) -> None:
    client: httpx.Client = stack["client"]
    page = client.get("/ui/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from the network
    for asset in ("app.js", "style.css"):
        assert client.get(f"/ui/{asset}").status_code == 200
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/ui/"
    assert client.get("/ui/../service/settings.py").status_code == 404


MODEL_ROW = '#models tr[data-model="ui"]'


def _version(n: int) -> str:
    return f'#versions tr[data-version="{n}"]'


def _job(job_id: str) -> str:
    return f'#jobs tr[data-job="{job_id}"]'


def _use_token(browser: WebDriver, token: str) -> None:
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    _click(browser, "#token-form button[type=submit]")
    _wait(browser, lambda d: d.find_element(By.ID, "mode").text == "token set", "token")


def test_the_page_shows_models_versions_and_jobs_as_the_api_does(
    stack: dict[str, Any], browser: WebDriver
) -> None:
    _open(browser, stack["url"])
    assert "mlp_bn" in _text(browser, MODEL_ROW)
    _click(browser, MODEL_ROW)
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, _version(3)), "versions")
    rows = browser.find_elements(By.CSS_SELECTOR, "#versions tr[data-version]")
    # 1 and 2 uploaded (2 serves), 3 trained by the finished job (promote=never).
    assert [v.get_attribute("data-version") for v in rows] == ["1", "2", "3"]
    trained = _text(browser, _version(3))
    assert stack["finished"][:8] in trained
    assert "statistics trained" in trained
    serving = _text(browser, _version(2))
    assert "serving" in serving
    assert "loaded" in serving
    assert "serving" not in _text(browser, _version(1))

    finished, running = _job(stack["finished"]), _job(stack["running"])
    status = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, finished), "job row")
    assert status.get_attribute("data-status") == "succeeded"
    assert "version 3" in _text(browser, finished)
    assert "running" in _text(browser, running)

    _click(browser, finished)
    _wait(browser, lambda d: _circles(d, "chart-loss", "train_loss") == FINISHED_EPOCHS, "curves")
    assert _circles(browser, "chart-loss", "val_loss") == FINISHED_EPOCHS
    assert _circles(browser, "chart-accuracy", "val_accuracy") == FINISHED_EPOCHS
    # Issue 16's fields: the kept epoch is named and marked, and each point's tooltip has its lr.
    job = stack["client"].get(f"/v1/jobs/{stack['finished']}").json()
    assert job["kept_epoch"] is not None
    assert f"kept epoch {job['kept_epoch']}" in _text(browser, "#job-summary")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-loss line.kept")
    tips = [
        t.get_attribute("textContent")
        for t in browser.find_elements(By.CSS_SELECTOR, "#chart-loss circle title")
    ]
    lrs = {m["epoch"]: m["lr"] for m in job["metrics"]}
    for epoch, lr in lrs.items():
        assert any(tip.startswith(f"epoch {epoch}:") and f"(lr {lr})" in tip for tip in tips), tips

    # The running job's curves have a point for each epoch it has finished so far, no more.
    _click(browser, running)
    _wait(browser, lambda d: "running" in d.find_element(By.ID, "job-status").text, "running job")
    done = len(stack["client"].get(f"/v1/jobs/{stack['running']}").json()["metrics"])
    assert _circles(browser, "chart-loss", "train_loss") <= done + 1


def test_a_running_jobs_detail_follows_its_event_stream(
    stack: dict[str, Any], browser: WebDriver
) -> None:
    """The selected running job is drawn from `GET /v1/jobs/{id}/events` as events arrive
    (`data-job-events` counts the events the page rendered; only the stream's reader sets it),
    and once another job is selected, the running one's events no longer draw."""
    _open(browser, stack["url"])
    _click(browser, _job(stack["running"]))
    _wait(browser, lambda d: "running" in d.find_element(By.ID, "job-status").text, "running job")

    def events(d: WebDriver) -> int:
        return int(d.find_element(By.TAG_NAME, "body").get_attribute("data-job-events") or 0)

    _wait(browser, lambda d: events(d) >= 3, "progress events from the job's stream")
    shown = _text(browser, _job(stack["running"]))
    assert "epoch" in shown
    assert "step" in shown
    _click(browser, _job(stack["finished"]))
    _wait(browser, lambda d: "succeeded" in d.find_element(By.ID, "job-status").text, "finished")
    after = events(browser)
    time.sleep(2.0)  # several heartbeats of the running job
    assert events(browser) == after  # its stream no longer draws over the selected job


def test_without_the_token_the_page_is_read_only(stack: dict[str, Any], browser: WebDriver) -> None:
    _open(browser, stack["url"])
    _click(browser, MODEL_ROW)
    button = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, _version(1) + " button"), "b")
    assert not button.is_enabled()
    assert _text(browser, "#mode") == "read-only"


def test_a_promote_from_the_page_changes_what_v1_serves(
    stack: dict[str, Any], browser: WebDriver
) -> None:
    client: httpx.Client = stack["client"]
    _open(browser, stack["url"])
    _use_token(browser, TOKEN)
    _click(browser, MODEL_ROW)
    _click(browser, _version(1) + " button")
    wait_until(lambda: client.get("/v1/models/ui").json()["serving_version"] == 1 or None, 30, "1")
    answer = client.post("/v1/models/ui/predict", json={"inputs": [[0.5, -0.5]]})
    assert answer.status_code == 200
    assert answer.json()["version"] == 1
    _wait(browser, lambda d: "serving" in _text(d, _version(1)), "the page to follow")

    # A known state for people to look at: model selected, the finished job's curves drawn.
    _click(browser, _job(stack["finished"]))
    _wait(browser, lambda d: _circles(d, "chart-loss", "train_loss") == FINISHED_EPOCHS, "curves")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    _assert_not_blank(shot)


def test_an_action_error_shows_the_servers_code_and_detail(
    stack: dict[str, Any], browser: WebDriver
) -> None:
    _open(browser, stack["url"])
    _use_token(browser, "wrong-token-0123456789")
    _click(browser, MODEL_ROW)
    _click(browser, "#versions tr:not(.serving) button")  # a version that is not serving
    error = _text(browser, "#error")
    assert error.startswith("401 "), error
    assert "token" in error.lower(), error
    browser.execute_script("sessionStorage.clear()")


def test_with_protected_reads_the_page_asks_for_the_token_first(
    tmp_path: Path, browser: WebDriver
) -> None:
    with running(tmp_path, PROTECT_READS=True) as (server, client):
        create_model(client, "secret", "mlp_bn")
        browser.get(server.url + "/ui/")
        _wait(browser, lambda d: "enter the API token" in _text(d, "#server-status"), "the ask")
        assert not browser.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")
        _use_token(browser, TOKEN)
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#models tr"), "models")
        assert "secret" in _text(browser, '#models tr[data-model="secret"]')
        browser.execute_script("sessionStorage.clear()")


def test_predict_start_and_cancel_from_the_page(stack: dict[str, Any], browser: WebDriver) -> None:
    client: httpx.Client = stack["client"]
    _open(browser, stack["url"])
    _use_token(browser, TOKEN)
    _click(browser, MODEL_ROW)
    _wait(browser, lambda d: d.find_element(By.ID, "predict-form").is_displayed(), "predict form")
    browser.find_element(By.ID, "predict-input").send_keys("0.5, -0.5")
    _click(browser, "#predict-form button")
    expected = client.post("/v1/models/ui/predict", json={"inputs": [[0.5, -0.5]]}).json()
    shown = _wait(browser, lambda d: d.find_element(By.ID, "predict-output").text, "the answer")
    assert f"version {expected['version']}" in shown
    assert f"prediction {expected['predictions'][0]}" in shown

    before = {job["id"] for job in client.get("/v1/jobs").json()}
    form = browser.find_element(By.ID, "job-form")
    epochs = form.find_element(By.NAME, "epochs")
    epochs.clear()
    epochs.send_keys("500")
    _click(browser, "#job-form button[type=submit]")
    started = wait_until(
        lambda: next((j for j in client.get("/v1/jobs").json() if j["id"] not in before), None),
        30,
        "the job started from the page",
    )
    assert started["params"]["epochs"] == 500
    _click(browser, _job(started["id"]) + " button")
    assert wait_job(client, started["id"], timeout=60)["status"] == "cancelled"


def _assert_not_blank(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is (nearly) one colour"
