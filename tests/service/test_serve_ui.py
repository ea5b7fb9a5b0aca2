"""The service's pages: ``/ui`` driven in headless Chromium, and the Swagger page at ``/``.

The browser is the system's (Debian's ``chromium`` and ``chromium-driver``, which
``.ci/run`` installs); Selenium is told where both are, so it never downloads one. Where
they are missing the browser tests are skipped, saying so in the summary (``-rs``).
Screenshots go to the test's temporary folder.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import image_file, post
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = "chromium"
CHROMEDRIVER = "chromedriver"
WAIT_S = 60  # for an answer from a server on a loaded machine
PHONE_WIDTH = 390


def browser_or_skip_reason() -> str | None:
    missing = [name for name in (CHROMIUM, CHROMEDRIVER) if shutil.which(name) is None]
    if missing:
        return (
            f"no {' or '.join(missing)} on PATH: install Debian's chromium and "
            "chromium-driver (`apt-get install chromium chromium-driver`, as .ci/run does)"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if reason := browser_or_skip_reason():
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1000,1400")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def find(driver, element_id: str):
    return driver.find_element("id", element_id)


def wait_for_answer(driver, *, states: tuple[str, ...] = ("done", "error")) -> str:
    """Wait until the page says it is in one of ``states`` (``body[data-state]``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state") in states
    )
    return driver.find_element("tag name", "body").get_attribute("data-state")


@contextlib.contextmanager
def answered(driver) -> Iterator[None]:
    """Around an action that sends a request: the page's answer to it, not the last one."""
    driver.execute_script("document.body.dataset.state = 'sent';")
    yield
    wait_for_answer(driver)


def shown_bars(driver) -> list[tuple[str, float, str]]:
    return [
        (item.get_attribute("data-label"), float(item.get_attribute("data-probability")),
         item.find_element("class name", "value").text)
        for item in driver.find_elements("css selector", "#bars li")
    ]  # fmt: skip


def screenshot(driver, folder: Path, name: str) -> None:
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), path
    assert Image.open(path).size[0] > 0


def test_the_page_shows_the_prediction_its_map_and_the_feature_maps(
    browser, server, probe_images, tmp_path
) -> None:
    image = probe_images[0]
    files = {"image": image_file(image)}
    predicted = post(server, "predict", files=files).json()
    explained = post(server, "explain", files=files).json()

    browser.get(f"{server}/ui")
    assert browser.title.startswith("convtune")
    with answered(browser):
        find(browser, "file").send_keys(str(image))
    assert browser.find_element("tag name", "body").get_attribute("data-state") == "done"
    screenshot(browser, tmp_path, "answered")

    # The label and probabilities are /predict's for the same file.
    assert find(browser, "label").text == predicted["label"]
    bars = shown_bars(browser)
    assert [(label, p) for label, p, _ in bars] == [
        (entry["label"], entry["probability"]) for entry in predicted["top_k"]
    ]
    for _, probability, text in bars:
        assert float(text.removesuffix("%")) == pytest.approx(probability * 100, abs=0.051)
    assert find(browser, "message").is_displayed() is False

    # The map lies over the image, both loaded; the slider sets its opacity (keyboard).
    photo, heat = find(browser, "photo"), find(browser, "heat")
    width, height = Image.open(image).size
    natural = "return [arguments[0].naturalWidth, arguments[0].naturalHeight]"
    assert browser.execute_script(natural, photo) == [width, height]
    assert browser.execute_script("return arguments[0].naturalHeight", heat) > 0
    assert heat.rect["width"] == pytest.approx(photo.rect["width"], abs=1)
    assert heat.rect["height"] == pytest.approx(photo.rect["height"], abs=1)
    from selenium.webdriver.common.keys import Keys

    slider = find(browser, "opacity")
    before = float(heat.value_of_css_property("opacity"))
    slider.send_keys(Keys.HOME)
    assert float(heat.value_of_css_property("opacity")) == 0.0 != before
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert find(browser, "opacity-value").text == "10%"
    assert float(heat.value_of_css_property("opacity")) == pytest.approx(0.1)

    # Another class's map, asked for from the class list.
    from selenium.webdriver.support.ui import Select

    other = next(
        entry["label"] for entry in predicted["top_k"] if entry["label"] != predicted["label"]
    )
    first_map = heat.get_attribute("src")
    with answered(browser):
        Select(find(browser, "map-class")).select_by_value(other)
    assert heat.get_attribute("src") != first_map

    # The feature-map browser: the stage with the most channels, its second page.
    stages = explained["stages"]
    index = max(range(len(stages)), key=lambda i: stages[i]["channels"])
    stage = stages[index]
    assert stage["channels"] > 16, "the test model has no stage with two pages"
    Select(find(browser, "stage")).select_by_value(str(index))
    assert find(browser, "previous").is_enabled() is False
    find(browser, "next").click()
    last = min(32, stage["channels"])
    assert find(browser, "page").text.startswith(f"Channels 17–{last} of {stage['channels']}")
    captions = [e.text for e in browser.find_elements("css selector", "#grid figcaption")]
    assert captions == [f"channel {c}" for c in stage["tiles"]["channels"][16:last]]
    assert find(browser, "previous").is_enabled()
    screenshot(browser, tmp_path, "feature-maps")

    # Nothing was loaded from anywhere but the service, and nothing went wrong.
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert {origin for origin in origins if origin != "null"} <= {server}  # "null": data:
    problems = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []


def test_the_page_shows_the_services_error_for_a_non_image(browser, server, tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image at all")
    expected = post(server, "predict", files={"image": image_file(notes)}).json()["error"]

    browser.get(f"{server}/ui")
    with answered(browser):
        find(browser, "file").send_keys(str(notes))
    assert browser.find_element("tag name", "body").get_attribute("data-state") == "error"
    message = find(browser, "message")
    assert message.is_displayed()
    assert message.text == f"/predict answered 400: {expected}"
    assert message.get_attribute("role") == "alert"
    assert not find(browser, "prediction").is_displayed()
    screenshot(browser, tmp_path, "error")


def test_the_page_fits_a_phone_and_labels_its_controls(browser, server, probe_images, tmp_path):
    browser.set_window_size(PHONE_WIDTH, 844)
    try:
        browser.get(f"{server}/ui")
        with answered(browser):
            find(browser, "file").send_keys(str(probe_images[1]))
        screenshot(browser, tmp_path, "phone")
        viewport = browser.execute_script("return document.documentElement.clientWidth")
        content = browser.execute_script("return document.documentElement.scrollWidth")
        assert content <= viewport  # no sideways scrolling
    finally:
        browser.set_window_size(1000, 1400)
    # Every control has a label a screen reader reads out.
    for control in browser.find_elements("css selector", "input, select"):
        control_id = control.get_attribute("id")
        assert browser.find_elements("css selector", f"label[for='{control_id}']"), control_id
    for button in browser.find_elements("tag name", "button"):
        assert button.text.strip()


def test_the_swagger_page_describes_this_service(server, exported) -> None:
    page = httpx.get(f"{server}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>convtune" in page.text
    assert "googletagmanager" not in page.text and "github-corner" not in page.text
    info = httpx.get(f"{server}/docs.json", timeout=30).json()["info"]
    assert info["title"] == "convtune image classifier"
    assert info["version"] == exported.tag
    assert "(ui)" in info["description"] and "BentoML Slack" not in info["description"]
    for route in ("/predict", "/predict_batch", "/explain", "/ui"):
        assert f"{route}`" in info["description"], route
    # The page's files are served, and nothing else from its folder.
    for path in ("/ui", "/ui/ui.js", "/ui/ui.css", "/static_content/swagger-ui-bundle.js"):
        assert httpx.get(f"{server}{path}", timeout=30).status_code == 200, path
    assert httpx.get(f"{server}/ui/api.html", timeout=30).status_code == 404
    policy = httpx.get(f"{server}/ui", timeout=30).headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
