"""The README's picture of the `tm-run serve` page: a finished toy video, a second job running.

    OMP_NUM_THREADS=1 python -m benchmarks.serve_screenshot [--out docs/serve-page.png] [--preset toy]

Serves the preset in this process (uvicorn on a free loopback port, a
temporary data folder), drives the page in headless Chromium through
selenium (the system's chromium and chromedriver), submits a prompt from
the form, waits for the final video to play, submits a second one, and
saves the window once the second job is past its blueprint.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_for(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "serve-page.png")
    p.add_argument("--preset", default="toy")
    p.add_argument("--prompt", default="a red ball bouncing on a striped background")
    p.add_argument("--second", default="a blue square sliding left on a gradient background")
    args = p.parse_args(argv)

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService
    from selenium.webdriver.common.by import By

    from tempomaster.runtime.request import GenerateOptions
    from tempomaster.serve.app import create_app
    from tempomaster.serve.server import ServeOptions, build_service

    with tempfile.TemporaryDirectory(prefix="tm-serve-shot-") as tmp:
        service = build_service(
            ServeOptions(base=GenerateOptions(preset=args.preset, threads=1), data=Path(tmp)),
            None,
            log=lambda line: None,
        )
        service.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 30, "the server")

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--autoplay-policy=no-user-gesture-required",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=DriverService(shutil.which("chromedriver")))
        try:
            driver.get(f"http://127.0.0.1:{port}/")

            def submit(prompt: str) -> None:
                box = driver.find_element(By.ID, "prompt")
                box.clear()
                box.send_keys(prompt)
                driver.find_element(By.ID, "submit").click()

            submit(args.prompt)
            wait_for(lambda: driver.find_elements(By.ID, "final-video"), 300, "the first video")
            first = driver.find_element(By.ID, "final-video").get_attribute("data-job")
            submit(args.second)
            second = wait_for(
                lambda: (
                    driver.execute_script(
                        "const li = document.querySelector('#jobs li.job'); return li && li.dataset.id;"
                    )
                    != first
                    and service.store.get(
                        driver.execute_script("return document.querySelector('#jobs li.job').dataset.id;")
                    ).has_blueprint
                ),
                300,
                "the second job's blueprint",
            )
            assert second
            # show the finished one in the player, the running one in the queue
            driver.find_element(By.CSS_SELECTOR, f'li.job[data-id="{first}"]').click()
            wait_for(
                lambda: driver.execute_script(
                    "const v = document.getElementById('final-video'); return v && v.currentTime > 0.3;"
                ),
                60,
                "playback",
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
            server.should_exit = True
            thread.join(10)
            service.stop()
            service.store.close()
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
