"""What the host and browser tests share: Chromium through Selenium, the screenshots folder, stopping a server."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess

import pytest

CHROMIUM = os.environ.get("CHROMIUM_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
BROWSER_MARKS = [
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium is not installed"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"),
]


@contextlib.contextmanager
def chromium(window_size, *arguments):
    """A headless Debian Chromium driven by chromedriver; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window_size}",
                     *arguments):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_folder(tmp_path_factory, name):
    """$DPM_TEST_ARTIFACTS/<name> (else a temporary folder) for screenshots."""
    folder = os.environ.get("DPM_TEST_ARTIFACTS")
    path = pathlib.Path(folder) / name if folder else tmp_path_factory.mktemp(name)
    path.mkdir(parents=True, exist_ok=True)
    print(f"\n[browser] screenshots in {path}")
    return path


def stop_process_group(process):
    """SIGTERM to a server started in its own process group, SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
