"""The web UI in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium),
against a real uvicorn on 127.0.0.1 and real child trainings of the tiny model.

Each test saves a screenshot of every page it visits into its temporary directory and fails if a
page shows a Python traceback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.train.helpers import chat_rows, tiny_overrides, write_chat
from tests.ui.conftest import TOKEN, ui_server

pytestmark = pytest.mark.browser

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
IDENTITY = Path(__file__).resolve().parents[2] / "src" / "tunesmith" / "assets" / "identity.jsonl"


@pytest.fixture
def server(tmp_path):
    """A real uvicorn serving the UI on a free port of 127.0.0.1; yields (the page's address with its token, runs dir)."""
    with ui_server(tmp_path / "runs") as ui:
        yield f"{ui.url}/?token={ui.token}", ui.runs


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, DRIVER) if not shutil.which(p)]
    assert not missing, f"{missing} not installed: apt-get install -y chromium chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                            "downloadPath": str(tmp_path / "downloads")})
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=f"waiting for {what}")


def _by(css: str):
    from selenium.webdriver.common.by import By

    return By.CSS_SELECTOR, css


def _shot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    assert "Traceback" not in driver.find_element(*_by("body")).text, f"the {name} page shows a traceback"


def _tab(driver, page: str) -> None:
    driver.find_element(*_by(f'.tab[data-page="{page}"]')).click()


def _set(driver, key: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    field = driver.find_element(By.ID, f"field-{key}")
    if field.tag_name == "select":
        Select(field).select_by_value(str(value))
    else:
        field.clear()
        field.send_keys(str(value))


def _fill_tiny_run(driver, model: Path, data: Path, out: Path, **extra) -> None:
    for item in tiny_overrides(model, data, out, **extra):
        key, value = item.split("=", 1)
        _set(driver, key, value)


def _text(driver, css: str) -> str:
    return driver.find_element(*_by(css)).text


def test_the_journey_in_a_browser(server, browser, tiny_model_dir, tmp_path):
    """Data: the identity data uploaded, its report and mask preview; Train: a field's help, the plan, a 5-step training;
    Runs: the loss chart fills and the run finishes; Chat: streamed answers of the run and its base; Evaluate
    against the base with its report; Export merged weights; then the page in Chinese."""
    url, runs = server
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(*_by("#train-form fieldset")), 30, "the generated form")
    assert "token" not in browser.current_url  # kept in the page, out of the address bar (and of screenshots)

    _tab(browser, "data")
    browser.find_element(*_by("#data-upload")).send_keys(str(IDENTITY))  # choose the file, as a person would
    uploaded = str((runs / "uploads" / "identity.jsonl").resolve())
    _wait(browser, lambda d: d.find_element(*_by("#data-files")).get_attribute("value") == uploaded, 10, "the upload")
    browser.find_element(*_by("#data-model")).send_keys(str(tiny_model_dir))
    browser.find_element(*_by("#data-check")).click()
    _wait(browser, lambda d: d.find_elements(*_by("#mask-preview .supervised")), 60, "the mask preview")
    assert "Examples: 32" in _text(browser, "#data-facts")
    _shot(browser, tmp_path, "data")

    _tab(browser, "train")
    lr_help = browser.find_element(*_by('label[for="field-train.lr"] ~ .help')).text
    assert "peak learning rate" in lr_help and "default: automatic" in lr_help
    data = write_chat(tmp_path / "train.jsonl", chat_rows())
    out = runs / "five-steps"
    _set(browser, "method.rewards", "regex:^\\d{1,3}$\nexact")  # a reward a line; the regex keeps its comma
    _wait(browser, lambda d: "--reward 'regex:^\\d{1,3}$' --reward exact" in _text(d, "#train-command"), 30,
          "a --reward for each line")
    _set(browser, "method.rewards", "")
    _fill_tiny_run(browser, tiny_model_dir, data, out, train__max_steps=5)
    _wait(browser, lambda d: "--train.max_steps 5" in _text(d, "#train-command"), 30, "the command")
    assert "--reward" not in _text(browser, "#train-command")
    browser.find_element(*_by("#plan-button")).click()
    _wait(browser, lambda d: "= 5 optimizer steps" in _text(d, "#plan-output"), 120, "the plan's steps line")
    assert "--plan" not in _text(browser, "#train-command")  # what Start runs, not the planning command
    _shot(browser, tmp_path, "train")

    browser.find_element(*_by("#start-button")).click()
    _wait(browser, lambda d: d.find_element(*_by("#page-runs")).is_displayed(), 30, "the Runs page")
    _wait(browser, lambda d: "finished" in _text(d, "#run-name"), 120, "the run to finish")
    _wait(browser, lambda d: d.find_element(*_by("#train-line")).get_attribute("data-points") == "5", 10,
          "five points on the loss chart")
    assert _text(browser, "#run-steps") == "5/5"
    assert browser.find_elements(*_by("#loss-chart .chart-axes"))  # the chart's axes, and its legend naming both lines
    assert [e.text for e in browser.find_elements(*_by("#loss-chart .chart-legend"))] == ["train loss", "held-out loss"]
    assert not browser.find_element(*_by("#reward-section")).is_displayed()  # an SFT run has no reward to chart
    _wait(browser, lambda d: not d.find_element(*_by("#run-stop")).is_displayed(), 30, "Stop to go once the child exits")
    row = browser.find_element(*_by(f'#runs-table tr[data-path="{out.resolve()}"]')).text
    assert "five-steps finished lora" in row
    _shot(browser, tmp_path, "runs")

    _tab(browser, "chat")
    _wait(browser, lambda d: d.find_element(*_by("#chat-model")).get_attribute("value") == str(out.resolve()), 10,
          "the finished run chosen for Chat")
    browser.find_element(*_by("#chat-max-new-tokens")).clear()
    browser.find_element(*_by("#chat-max-new-tokens")).send_keys("12")
    browser.find_element(*_by("#chat-compare")).click()
    browser.find_element(*_by("#chat-input")).send_keys("Who are you?")
    browser.find_element(*_by("#chat-send")).click()
    _wait(browser, lambda d: len(d.find_elements(*_by(".msg.assistant.done"))) == 2, 60, "both streamed answers")
    answers = [a.text for a in browser.find_elements(*_by(".msg.assistant"))]
    assert all(answers), answers
    _shot(browser, tmp_path, "chat")

    _tab(browser, "eval")
    assert browser.find_element(*_by("#eval-model")).get_attribute("value") == str(out.resolve())
    browser.find_element(*_by("#eval-data")).send_keys(str(data))
    browser.find_element(*_by("#eval-metrics")).send_keys("rouge,chrf")
    browser.find_element(*_by("#eval-limit")).send_keys("4")
    browser.find_element(*_by("#eval-start")).click()
    _wait(browser, lambda d: d.find_elements(*_by("#eval-status .job-done")), 120, "the evaluation to end")
    assert browser.find_elements(*_by('#eval-report img[alt="metric_deltas.png"]'))  # its charts, shown
    report = _text(browser, "#eval-report-md")
    assert "base" in report and "Worst examples by ROUGE-L" in report
    assert _text(browser, "#eval-command").endswith("--compare base --metrics rouge,chrf --limit 4")
    _shot(browser, tmp_path, "eval")

    _tab(browser, "export")
    from selenium.webdriver.support.ui import Select

    assert not browser.find_element(*_by("#export-dtype")).is_displayed()  # a merge has no GGUF type
    Select(browser.find_element(*_by("#export-format"))).select_by_value("gguf")
    assert browser.find_element(*_by("#export-dtype")).is_displayed()
    Select(browser.find_element(*_by("#export-format"))).select_by_value("merge")
    assert browser.find_element(*_by('link[rel="icon"]')).get_attribute("href").endswith("/static/favicon.svg")
    merged = runs / "exports" / "merged"
    browser.find_element(*_by("#export-out")).clear()
    browser.find_element(*_by("#export-out")).send_keys(str(merged))
    browser.find_element(*_by("#export-start")).click()
    _wait(browser, lambda d: d.find_elements(*_by("#export-status .job-done")), 120, "the export")
    assert str(merged) in _text(browser, "#export-log") and (merged / "config.json").is_file()
    _shot(browser, tmp_path, "export")

    _tab(browser, "runs")
    Select(browser.find_element(*_by("#lang"))).select_by_value("zh")
    assert _text(browser, '.tab[data-page="train"]') == "训练"
    assert "已完成" in _text(browser, "#run-name") and _text(browser, "#runs-refresh") == "刷新"
    _shot(browser, tmp_path, "runs-zh")
    _tab(browser, "train")
    assert _text(browser, "#plan-button") == "生成计划"
    lr_help = browser.find_element(*_by('label[for="field-train.lr"] ~ .help')).text
    assert lr_help.startswith("峰值学习率") and lr_help.endswith("(默认: 自动)")
    _shot(browser, tmp_path, "train-zh")
    _tab(browser, "chat")
    assert _text(browser, "#chat-send") == "发送"
    _shot(browser, tmp_path, "chat-zh")


def test_a_reload_reattaches_to_the_training_stop_leaves_a_checkpoint_and_resume_finishes(server, browser, tiny_model_dir,
                                                                          tmp_path):
    from tunesmith.train.checkpoint import damage, list_checkpoints

    url, runs = server
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(*_by("#train-form fieldset")), 30, "the generated form")
    out = runs / "long"
    _fill_tiny_run(browser, tiny_model_dir, write_chat(tmp_path / "train.jsonl", chat_rows()), out,
                   train__max_steps=500)
    browser.find_element(*_by("#start-button")).click()

    def steps(d) -> int:
        done = _text(d, "#run-steps").split("/")[0]
        return int(done) if done.isdigit() else 0

    _wait(browser, lambda d: steps(d) >= 2, 120, "the first steps")
    browser.execute_script("localStorage.removeItem('tunesmith.run')")  # a fresh tab knows nothing
    browser.refresh()
    _wait(browser, lambda d: "running" in _text(d, "#run-name"), 30, "the running run after the reload")
    seen = steps(browser)
    _wait(browser, lambda d: steps(d) > seen, 60, "progress after the reload")
    _shot(browser, tmp_path, "runs-reloaded")

    browser.find_element(*_by("#run-stop")).click()
    _wait(browser, lambda d: "stopped" in _text(d, "#run-name"), 120, "the run to stop")
    assert "--resume auto" in _text(browser, "#run-log")
    complete = [path for _, path, ok in list_checkpoints(out) if ok]
    assert complete and damage(complete[-1]) is None
    _shot(browser, tmp_path, "runs-stopped")

    browser.find_element(*_by("#run-resume")).click()
    _wait(browser, lambda d: "finished" in _text(d, "#run-name"), 120, "the resumed run to finish")
    assert _text(browser, "#run-steps") == "500/500"
    _shot(browser, tmp_path, "runs-resumed")


# ------------------------------------------------------------------ a hostile page on another port of localhost

ATTACK = """<!doctype html><script>
const ui = %(ui)s, token = %(token)s, results = {};
async function attempt(name, path, init) {
  try { const r = await fetch(ui + path, init); results[name] = `${r.type} ${r.status}`; }
  catch (error) { results[name] = `blocked ${error.name}`; }
}
// text/plain and no Content-Type are "simple" requests: the browser sends them without asking the server first
const simple = (body, type) => ({ method: "POST", mode: "no-cors", body, headers: type ? { "Content-Type": type } : {} });
(async () => {
  for (const [name, path, body] of %(attempts)s) {
    await attempt(name, path, simple(typeof body === "string" ? body : JSON.stringify(body), "text/plain"));
    await attempt(name + " untyped", path, simple(typeof body === "string" ? body : JSON.stringify(body), null));
    await attempt(name + " token", path, { method: "POST", body: JSON.stringify(body),  // needs a preflight
      headers: { "Content-Type": "application/json", "X-Tunesmith-Token": token } });
  }
  window.attackDone = results;
})();
</script>"""


@pytest.fixture
def attacker_site(tmp_path):
    """A plain web server on another port of 127.0.0.1 serving whatever page the test writes; yields (url, folder)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "attacker"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{site.server_address[1]}", folder
    site.shutdown()


def _attack(browser, site, ui, attempts: list) -> dict:
    """Open a page on the attacker's origin that posts ``attempts`` [(name, path, body)] to the UI; its results."""
    import json

    url, folder = site
    # the attacker even knows the token here (a leak): Origin and the preflight still stop every request
    (folder / "attack.html").write_text(ATTACK % {"ui": json.dumps(ui.url), "token": json.dumps(TOKEN),
                                                  "attempts": json.dumps(attempts)})
    browser.get(f"{url}/attack.html")
    return _wait(browser, lambda d: d.execute_script("return window.attackDone"), 30, "the attack page")


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "insecure-no-auth"])
def test_a_page_on_another_port_cannot_upload_convert_or_start(browser, attacker_site, tmp_path, token):
    with ui_server(tmp_path / "runs", token=token) as ui:
        upload = ui.runs / "uploads" / "in.jsonl"
        upload.parent.mkdir(parents=True)
        upload.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
        convert_out, start_out = ui.runs / "converted.jsonl", ui.runs / "started"
        results = _attack(browser, attacker_site, ui, [
            ["upload", f"/api/data/upload?name=evil.jsonl&token={TOKEN}", "pwned\n"],
            ["convert", "/api/data/convert", {"file": str(upload), "to": "alpaca", "out": str(convert_out)}],
            ["start", "/api/train/start", {"output.output_dir": str(start_out), "model.name": "x"}]])
        assert len(results) == 9, results
        assert all(r in ("opaque 0", "blocked TypeError") for r in results.values()), results
        assert sorted(p.name for p in upload.parent.iterdir()) == ["in.jsonl"]
        assert not convert_out.exists() and not start_out.exists()


def test_a_page_on_another_port_cannot_stop_or_resume_a_training(browser, attacker_site, tiny_model_dir, tmp_path):
    """Against the UI with no token at all (--insecure-no-auth), so that only the Origin check stands in the way."""
    import json

    from tunesmith.runs import PROCESS_FILE

    with ui_server(tmp_path / "runs", token=None) as ui, ui.client() as client:
        out = ui.runs / "live"
        values = dict(i.split("=", 1) for i in tiny_overrides(tiny_model_dir, write_chat(tmp_path / "t.jsonl", chat_rows()),
                                                                out, train__max_steps=500))
        pid = client.post("/api/train/start", json=values).json()["pid"]
        _wait(browser, lambda d: len(client.get("/api/run", params={"path": str(out)}).json()["metrics"]) >= 2, 120,
              "the first steps")
        _attack(browser, attacker_site, ui, [["stop", "/api/train/stop", {"path": str(out)}]])
        run = client.get("/api/run", params={"path": str(out)}).json()
        assert (run["status"], run["stoppable"], run["pid"]) == ("running", True, pid)

        assert client.post("/api/train/stop", json={"path": str(out)}).status_code == 200  # the page's own stop
        _wait(browser, lambda d: json.loads((out / PROCESS_FILE).read_text())["returncode"] is not None, 120,
              "the run to stop")
        _attack(browser, attacker_site, ui, [["resume", "/api/train/resume", {"path": str(out)}]])
        run = client.get("/api/run", params={"path": str(out)}).json()
        assert (run["status"], run["stoppable"], json.loads((out / PROCESS_FILE).read_text())["pid"]) == (
            "stopped", False, pid)


def test_an_html_file_in_a_run_downloads_instead_of_running_on_the_ui(server, browser, tmp_path):
    url, runs = server
    run = runs / "sent-to-me"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a run, as someone sent it
    (run / "README.html").write_text(
        "<script>document.title = 'pwned'; fetch('/api/data/upload?name=evil.jsonl', {method: 'POST', body: 'x', "
        "headers: {'X-Tunesmith-Token': sessionStorage.getItem('tunesmith.token')}})</script>")
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(*_by("#train-form fieldset")), 30, "the page")
    _tab(browser, "runs")
    _wait(browser, lambda d: d.find_elements(*_by(".open-run")), 30, "the run in the table")
    browser.find_element(*_by(".open-run")).click()
    link = _wait(browser, lambda d: [a for a in d.find_elements(*_by("#run-files a")) if a.text == "README.html"],
                 30, "the run's files")[0]
    link.click()
    _wait(browser, lambda d: (tmp_path / "downloads" / "README.html").is_file(), 30, "the download")
    assert browser.title == "tunesmith" and not (runs / "uploads" / "evil.jsonl").exists()

    named = runs / "<img src=x onerror=document.title='pwned'>"  # a run's name is shown as text, never as HTML
    named.mkdir()
    (named / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    _wait(browser, lambda d: named.name in _text(d, "#runs-table"), 30, "the run with a markup name")
    assert not browser.find_elements(*_by("#runs-table img")) and browser.title == "tunesmith"


def test_a_grpo_run_charts_its_rewards(server, browser, tiny_model_dir, tmp_path):
    """A real 4-step GRPO run of the tiny model with two reward functions: the Runs page charts the summed reward and
    each function's, one point per step."""
    from tests.train.test_grpo import REWARDS, grpo_overrides
    from tunesmith.config import load_config
    from tunesmith.train.loop import finetune

    url, runs = server
    data, rewards = tmp_path / "prompts.jsonl", tmp_path / "rewards.py"
    data.write_text("".join(f'{{"prompt": "What is {i} plus {i}?", "answer": "{2 * i}"}}\n' for i in range(8)))
    rewards.write_text(REWARDS, encoding="utf-8")
    finetune(load_config(None, grpo_overrides(tiny_model_dir, data, rewards, runs / "rewarded")))
    browser.get(url)
    _wait(browser, lambda d: d.find_elements(*_by("#train-form fieldset")), 30, "the page")
    _tab(browser, "runs")
    _wait(browser, lambda d: d.find_elements(*_by(".open-run")), 30, "the run in the table")
    browser.find_element(*_by(".open-run")).click()
    _wait(browser, lambda d: d.find_element(*_by("#reward-section")).is_displayed(), 30, "the reward chart")
    assert [e.text for e in browser.find_elements(*_by("#reward-chart .chart-legend"))] == ["reward", "short",
                                                                                            "mentions"]
    points = [e.get_attribute("data-points") for e in browser.find_elements(*_by("#reward-chart polyline[id]"))]
    assert points == ["4", "4", "4"]
    _shot(browser, tmp_path, "rewards")
