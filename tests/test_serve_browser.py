"""The page of tm-run serve in headless Chromium (selenium + Debian's chromium and chromedriver).

Run with: python -m pytest -m browser tests/test_serve_browser.py
(apt-get install chromium chromium-driver; skipped without them).
"""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.browser

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_helpers import live_server, make_service, wait_for  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)


def open_browser(width: int = 1280, height: int = 900):
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--mute-audio",
        "--autoplay-policy=no-user-gesture-required",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tempomaster.serve.app import create_app

    service = make_service(tmp_path_factory.mktemp("serve-browser"))
    service.start()
    with live_server(create_app(service)) as base:
        yield base, service
    service.stop()
    service.store.close()


@pytest.fixture(scope="module")
def browser():
    driver = open_browser()
    yield driver
    driver.quit()


def fill_and_submit(driver, prompt: str, steps: str) -> None:
    from selenium.webdriver.common.by import By

    for field, value in (("prompt", prompt), ("num-frames", "9"), ("height", "32"), ("width", "48"), ("steps", steps)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "submit").click()


def newest_job_id(driver) -> str:
    return wait_for(
        lambda: driver.execute_script("const li = document.querySelector('#jobs li.job'); return li && li.dataset.id;"),
        timeout=30,
        what="the new job in the queue",
    )


def test_submit_blueprint_first_then_the_final_video_plays_then_cancel_a_second(server, browser):
    from selenium.webdriver.common.by import By

    base, service = server
    browser.get(base + "/")
    assert browser.title == "TempoMaster"
    # stage 1 long enough that the blueprint is on the page a while before the final video replaces it
    fill_and_submit(browser, "a red ball bouncing on a striped background", "2,25,2")
    job_id = newest_job_id(browser)
    wait_for(lambda: browser.find_elements(By.ID, "blueprint-video"), timeout=60, what="the blueprint element")
    assert not browser.find_elements(By.ID, "final-video")
    assert service.store.get(job_id).state == "running"  # shown while the later stages still run
    wait_for(lambda: browser.find_elements(By.ID, "final-video"), timeout=120, what="the final video element")
    assert browser.execute_script("return window.tmShown") == [f"blueprint:{job_id}", f"final:{job_id}"]
    assert not browser.find_elements(By.ID, "blueprint-video")  # replaced, not stacked

    # the element really plays the file: its metadata decoded, its clock moving
    meta = wait_for(
        lambda: browser.execute_script(
            "const v = document.getElementById('final-video');"
            "return v.readyState >= 1 && !v.error ? [v.duration, v.videoWidth, v.videoHeight] : null;"
        ),
        timeout=30,
        what="the final video's metadata",
    )
    duration, width, height = meta
    assert duration == pytest.approx(36 / 24, abs=0.05)  # 36 frames at 24 fps
    assert (width, height) == (48, 32)
    wait_for(
        lambda: browser.execute_script("return document.getElementById('final-video').currentTime > 0"),
        timeout=30,
        what="the final video to play",
    )
    state = browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{job_id}"] .state')
    wait_for(lambda: state.text == "done", timeout=10, what="the queue to say done")
    bars = browser.find_elements(By.CSS_SELECTOR, f'li.job[data-id="{job_id}"] .stage-bar.done')
    assert len(bars) == 3

    # a second job, cancelled from its row while it runs
    fill_and_submit(browser, "a blue square sliding left", "300,2,2")
    second = wait_for(lambda: (j := newest_job_id(browser)) != job_id and j, timeout=30, what="the second job")
    wait_for(
        lambda: (service.store.get(second).steps_done or 0) > 0 or service.board.live(second),
        timeout=60,
        what="the second job to run",
    )
    browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{second}"] button.cancel').click()
    row_state = browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{second}"] .state')
    wait_for(lambda: row_state.text == "cancelled", timeout=30, what="the page to show the cancel")
    assert service.store.get(second).state == "cancelled"
    assert not browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{second}"] button.cancel').is_displayed()
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert logs == []


def test_with_a_token_the_page_asks_for_it_and_plays_the_video(server, browser):
    """Beyond loopback every API call carries the token: the page's fetches, its event stream and its videos."""
    from selenium.webdriver.common.by import By

    from tempomaster.serve.app import Service, create_app

    _, service = server
    guarded = Service(
        runner=service.runner,
        store=service.store,
        data=service.data,
        board=service.board,
        metrics=service.metrics,
        workers=service.workers,
        token="page-token-1234",
    )
    with live_server(create_app(guarded)) as base:
        browser.get(base + "/")
        token_row = browser.find_element(By.ID, "token-row")
        wait_for(lambda: token_row.is_displayed(), timeout=15, what="the page to ask for the token")
        browser.find_element(By.ID, "token").send_keys("page-token-1234")
        browser.find_element(By.ID, "token-save").click()
        fill_and_submit(browser, "a green triangle circling", "2,2,2")
        wait_for(lambda: browser.find_elements(By.ID, "final-video"), timeout=120, what="the final video")
        src = browser.find_element(By.ID, "final-video").get_attribute("src")
        assert src.startswith("blob:")  # fetched with the header, not by the element
        width = wait_for(
            lambda: browser.execute_script(
                "const v = document.getElementById('final-video'); return v.readyState >= 1 && v.videoWidth;"
            ),
            timeout=30,
            what="the video's metadata",
        )
        assert width == 48
        browser.execute_script("sessionStorage.clear()")
