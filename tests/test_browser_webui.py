"""The extension in a real AUTOMATIC1111 WebUI page: headless Chromium driven by Selenium against the CPU server of
tests/webui_host.py (the WebUI's own launch.py, this checkout linked as an extension, a tiny checkpoint).

- txt2img: pick each of our samplers in the "Sampling method" dropdown as a user does, generate, and check that an
  image arrives and that the infotext names the sampler (and, for DPM-Solver-v3, what it ran).
- The DPM-Solver-v3 tab: the cost estimate follows the settings (``EMSSettings.cost``); Compute EMS at the default
  grid and sample count shows its progress rising, the tab's Interrupt stops it and nothing is stored; then a tiny
  computation (N 10, K 8) runs to the end, the tab says what the EMS decide, and a DPM-Solver-v3 generation in
  txt2img uses them (infotext).

Screenshots go to $DPM_TEST_ARTIFACTS/browser_webui (else the test's temporary folder).  Needs WEBUI_DIR (an
A1111 checkout, see webui_host.py), Debian's chromium + chromium-driver and the selenium package; skips without,
and on Forge / reForge checkouts.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import time

import pytest

from browser_support import BROWSER_MARKS, artifacts_folder, chromium
from webui_host import FORGE_SKIP_REASON, IS_FORGE_FAMILY, SKIP_REASON, WEBUI_DIR, webui_server

pytestmark = [pytest.mark.skipif(not WEBUI_DIR, reason=SKIP_REASON),
              pytest.mark.skipif(IS_FORGE_FAMILY, reason=FORGE_SKIP_REASON), *BROWSER_MARKS]

catalog = importlib.import_module("dpm_solver_nodes.scripts.dpm_solver_webui.catalog")
STEPS, SIZE = 6, 64
TINY_EMS = {"dpm_solver_ems_grid": 25, "dpm_solver_ems_samples": 8, "dpm_solver_ems_x0_steps": 4}  # least checked N
PROGRESS = re.compile(r"([\d,]+) / ([\d,]+) sample evaluations")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with webui_server(tmp_path_factory) as instance:
        yield instance


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return artifacts_folder(tmp_path_factory, "browser_webui")


@pytest.fixture(scope="module")
def page(server):
    with chromium("1400,1100") as driver:
        driver.get(server.url)
        wait_for(driver, lambda: driver.execute_script(
            "return !!window.gradioApp && !!gradioApp().querySelector('#txt2img_generate')"), 120, "the page to load")
        yield Page(driver)


def wait_for(driver, condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Page:
    """The WebUI page as a user works it: tabs, number boxes, the dropdown, buttons."""

    def __init__(self, driver):
        self.driver = driver

    def find(self, css):
        return self.driver.execute_script("return gradioApp().querySelector(arguments[0])", css)

    def text(self, css):
        element = self.find(css)
        return element.text if element is not None else ""

    def open_tab(self, title):
        self.driver.execute_script(
            "[...gradioApp().querySelectorAll('#tabs > .tab-nav > button')]"
            ".find(b => b.textContent.trim() === arguments[0]).click(); window.scrollTo(0, 0)", title)
        time.sleep(0.5)

    def type_number(self, elem_id, value):
        """Select the number box of a slider or number field, type ``value``, leave the box (its change event)."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)
        wait_for(self.driver, lambda: box.get_attribute("value") == str(value), 10, f"{elem_id} = {value}")

    def choose(self, elem_id, label):
        """Open the dropdown and click the entry ``label``."""
        self.find(f"#{elem_id} input").click()
        option = wait_for(self.driver, lambda: self.driver.execute_script(
            "return [...gradioApp().querySelectorAll(`#${arguments[0]} ul.options li`)]"
            ".find(li => li.getAttribute('data-value') === arguments[1])", elem_id, label), 10, f"option {label}")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", option)
        option.click()
        wait_for(self.driver, lambda: self.find(f"#{elem_id} input").get_attribute("value") == label, 10,
                 f"{elem_id} showing {label}")

    def screenshot(self, path, show=None):
        """Save a screenshot, with the element ``show`` (a CSS selector) scrolled into the middle of the view."""
        if show is not None:
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", self.find(show))
        self.driver.save_screenshot(str(path))


def generate(page, label, timeout=300):
    """Choose ``label`` in txt2img, generate, and return (infotext, seconds) once the new image is shown."""
    page.open_tab("txt2img")
    page.choose("txt2img_sampling", label)
    before = page.text("#html_info_txt2img")
    started = time.perf_counter()
    page.find("#txt2img_generate").click()

    def finished():
        error = page.text("#html_log_txt2img .error")
        if error:
            pytest.fail(f"{label}: the WebUI shows an error: {error}")
        info = page.text("#html_info_txt2img")
        return info if info != before and f"Sampler: {label}" in info else None

    info = wait_for(page.driver, finished, timeout, f"the {label} image")
    seconds = time.perf_counter() - started
    wait_for(page.driver, lambda: page.driver.execute_script(
        "const images = [...gradioApp().querySelectorAll('#txt2img_gallery img')];"
        "return images.length > 0 && images.every(i => i.complete && i.naturalWidth === arguments[0])", SIZE),
             30, f"the {label} image shown at {SIZE} px")
    return info, seconds


def txt2img_settings(page):
    page.open_tab("txt2img")
    for elem_id, value in (("txt2img_steps", STEPS), ("txt2img_width", SIZE), ("txt2img_height", SIZE)):
        page.type_number(elem_id, value)


def outcome(page):
    """The tab's outcome box."""
    return page.find("#dpm_solver_ems_status textarea").get_attribute("value") or ""


def final_outcome(page, ending):
    """The outcome box's text once it reports a job's end (read once per poll: the box changes between reads), else
    "" for ``wait_for``; ``ending`` tells an end of this job from the previous one's."""
    text = outcome(page)
    return text if text.startswith("EMS") and ending(text) else ""


def infotext_field(info, name):
    match = re.search(rf'{re.escape(name)}: ("[^"]*"|[^,\n]*)', info)
    return match.group(1).strip('"') if match else None


def test_each_sampler_generates_from_the_txt2img_dropdown(page, artifacts):
    txt2img_settings(page)
    times = {}
    for entry in catalog.ENTRIES:
        info, times[entry.label] = generate(page, entry.label)
        assert f"Steps: {STEPS}," in info and f"Size: {SIZE}x{SIZE}" in info, info
        if entry.uses_ems:       # CFG 7, no EMS computed yet: the corrector is off, so the paper's 2M runs
            assert infotext_field(info, "DPM-Solver-v3 EMS") == "none", info
            assert infotext_field(info, "DPM-Solver-v3 ran") == "DPM-Solver++(2M) (no EMS and corrector off)", info
        if entry.sampler == "dpm_solver_adaptive":
            assert re.search(r"DPM-Solver adaptive: \d+ model calls", info), info
        page.screenshot(artifacts / f"txt2img_{catalog.method_slug(entry.method)}.png", show="#html_info_txt2img")
    print("\n[browser] txt2img seconds per sampler: " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))


def test_ems_tab_estimate_progress_interrupt_and_a_run_that_v3_uses(page, server, artifacts):
    from dpm_solver_nodes.stats.settings import EMSSettings

    page.open_tab("DPM-Solver-v3")
    for elem_id in ("dpm_solver_ems_width", "dpm_solver_ems_height"):
        page.type_number(elem_id, SIZE)
    # the estimate is EMSSettings.cost of the tab's settings (EMSSettings' N and K, 20 data steps; batch 4)
    default_rows = EMSSettings(x0_steps=20).cost(guided=True)["total"]
    wait_for(page.driver, lambda: f"Cost: {default_rows:,} model rows" in page.text("#dpm_solver_ems_estimate"), 10,
             "the default estimate")
    page.screenshot(artifacts / "ems_tab_estimate.png")

    # the default job: its progress rises, the tab's Interrupt stops it, nothing is stored
    page.find("#dpm_solver_ems_compute").click()
    counts, started = [], time.perf_counter()

    def progressed():
        match = PROGRESS.search(page.text("#dpm_solver_ems_progress_box"))
        if match:
            done = int(match.group(1).replace(",", ""))
            if not counts or done != counts[-1]:
                counts.append(done)
        return len([c for c in counts if c > 0]) >= 3

    wait_for(page.driver, progressed, 300, "three progress updates")
    first_seconds = time.perf_counter() - started
    assert counts == sorted(counts) and counts[-1] > counts[0], counts
    page.screenshot(artifacts / "ems_tab_running.png")
    page.find("#dpm_solver_ems_interrupt").click()
    message = wait_for(page.driver, lambda: final_outcome(page, lambda text: True), 120,
                       "the interrupted job's outcome")
    assert message.startswith("EMS not computed: interrupted"), message
    assert list(server.ems_dir.glob("*.safetensors")) == []
    page.screenshot(artifacts / "ems_tab_interrupted.png")

    # a tiny job to the end
    for elem_id, value in TINY_EMS.items():
        page.type_number(elem_id, value)
    tiny_rows = EMSSettings(N=25, K=8, x0_steps=4).cost(guided=True)["total"]
    wait_for(page.driver, lambda: f"Cost: {tiny_rows:,} model rows" in page.text("#dpm_solver_ems_estimate"), 10,
             "the tiny estimate")
    started = time.perf_counter()
    page.find("#dpm_solver_ems_compute").click()
    message = wait_for(page.driver, lambda: final_outcome(page, lambda text: "interrupted" not in text), 600,
                       "the tiny job's outcome")
    tiny_seconds = time.perf_counter() - started
    assert message.startswith("EMS stored: "), message
    # N 25, K 8: the smallest grid at K 8 that leaves rows for the v3-vs-DPM-Solver++ check; the tab says its choice
    assert "\nDPM-Solver-v3 runs " in message and "No check ran" not in message, message
    stored = list(server.ems_dir.glob("*.safetensors"))
    assert len(stored) == 1, stored
    match = PROGRESS.search(page.text("#dpm_solver_ems_progress_box"))
    assert match and match.group(1) == match.group(2), page.text("#dpm_solver_ems_progress_box")
    page.screenshot(artifacts / "ems_tab_done.png")
    print(f"\n[browser] EMS tab: default job's third progress update after {first_seconds:.1f} s (counts {counts}); "
          f"tiny job (N 25, K 8, 4 data steps, {SIZE}x{SIZE}) {tiny_seconds:.1f} s")

    # DPM-Solver-v3 in txt2img at the tab's CFG (7, both defaults) uses them
    txt2img_settings(page)
    info, _ = generate(page, "DPM-Solver-v3 (dpm-solver-nodes)")
    ems = infotext_field(info, "DPM-Solver-v3 EMS")
    assert ems and ems.endswith("cfg 7 N 25 K 8 per_channel"), info
    # what ran is the tiny job's stored decision at 6 NFE (v3, or the DPM-Solver++ its check chose); the WebUI's
    # default (Karras) sigmas are not the spacing the decision was measured on, and the infotext says so
    ran = infotext_field(info, "DPM-Solver-v3 ran")
    assert re.fullmatch(r"v3 with EMS, corrector (on|off) \(checked at 6 NFE: error ratio [\d.]+; not on this "
                        r"schedule\)|DPM-Solver\+\+\([23]M\) \(the EMS check chose it over v3 at 6 NFE; stored "
                        r"error ratio [\d.]+; not on this schedule\)", ran), info
    page.screenshot(artifacts / "txt2img_dpm_solver_v3_with_ems.png", show="#html_info_txt2img")
