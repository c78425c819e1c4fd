"""The suite's browser: Debian's ``chromium`` and ``chromium-driver``, headless, driven by
Selenium (``make install`` installs both when missing; ``.ci/run`` does on CI).

What a person sees is tested as a person sees it: tests open Label Studio's pages, wait on
what is shown (a deadline each, never a fixed sleep), and keep a screenshot and the page's HTML
when they fail (``screenshots_on_failure``: under ``SFTFLOW_TEST_ARTIFACTS``, by default
``.test-artifacts/browser/`` in the checkout; the failure names the files).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("SFTFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SFTFLOW_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("SFTFLOW_TEST_ARTIFACTS",
                                Path(__file__).parents[1] / ".test-artifacts")) / "browser"


def chromium() -> Any:
    """A headless Chromium session. Missing binaries fail the test with how to install them
    (the suite does not skip what it cannot see)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (shutil.which(p) or Path(p).exists())]
    if missing:
        pytest.fail(f"no browser for the editor tests: {', '.join(missing)} not found; install "
                    "Debian's chromium and chromium-driver (`make install-browser`)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    """``condition(driver)`` once truthy (polled until ``timeout`` s); a TimeoutError naming
    ``what`` otherwise."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException,
        InvalidElementStateException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # A React page re-renders: an element found a moment ago may be gone, covered or not yet
    # interactable; poll again (missing elements are ignored by WebDriverWait already).
    ignored = (StaleElementReferenceException, InvalidElementStateException,  # and not interactable
               ElementClickInterceptedException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        raise TimeoutError(f"not shown within {timeout:.0f} s: {what} (page {driver.current_url})") from None


def visible(css: str) -> Callable[[Any], Any]:
    """A condition: the elements matching ``css`` that are displayed (None while there are none)."""
    from selenium.webdriver.common.by import By

    def shown(driver: Any) -> Any:
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        return found or None

    return shown


def log_in(driver: Any, base_url: str, email: str, password: str, timeout: float = 60) -> None:
    """Label Studio's login form, as a person fills it."""
    from selenium.webdriver.common.by import By

    driver.get(base_url.rstrip("/") + "/user/login/")
    wait_for(driver, visible("input[name=email]"), timeout, "the login form")[0].send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    wait_for(driver, lambda d: "/user/login" not in d.current_url, timeout, "the page after login")


@contextlib.contextmanager
def screenshots_on_failure(driver: Any, name: str) -> Iterator[None]:
    """On an exception: the screenshot and HTML of the page, named in the re-raised error."""
    try:
        yield
    except Exception as err:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(stem.with_suffix(".png")))
            stem.with_suffix(".html").write_text(driver.page_source)
        raise AssertionError(f"{err} [screenshot: {stem.with_suffix('.png')}]") from err


def contrast_ratio(foreground: str, background: str) -> float:
    """WCAG contrast ratio of two CSS ``rgb()``/``rgba()`` colours (1: invisible, 21: black on
    white); WCAG asks 4.5 for body text."""
    def luminance(css: str) -> float:
        r, g, b = (int(x) / 255 for x in re.findall(r"[\d.]+", css)[:3])
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)
