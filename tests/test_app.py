"""The Gradio demo (`app.py`, `fpmgm_hf.demo.app`): the page's field checks, streamed runs that end with a full
canvas and match `generate`, readable failures after which the handlers keep working, and the real page in
headless Chromium (Debian's chromium + chromium-driver, installed by `scripts/setup.sh`)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fpmgm_hf.demo import app as engine
from fpmgm_hf.demo import render
from fpmgm_hf.demo.app import DemoModels, LoadError, SettingsError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import app  # noqa: E402

GOOD = dict(budget=72, steps=0, reuse="3sr", fp_schedule="decreasing", temperature=1.0, seed=0, delay_ms=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return DemoModels.load(engine.build_tiny_models(tmp_path_factory.mktemp("tiny")), log=lambda *_: None)


def text_request(prompt="ROMEO:", suffix="", max_new_tokens=24, **overrides):
    return engine.parse_text_request(prompt, suffix, max_new_tokens, **dict(GOOD, sampler="ancestral", **overrides))


def run(stream):
    items = list(stream)
    assert isinstance(items[-1], engine.RunResult) and all(isinstance(f, engine.Frame) for f in items[:-1])
    return items[:-1], items[-1]


# ------------------------------------------------------------------------------------------- field checks

BAD_FIELDS = [
    ("prompt", 42, "Prompt"), ("prompt", "x" * (engine.MAX_PROMPT_CHARS + 1), "Prompt"), ("suffix", ["a"], "Suffix"),
    ("max_new_tokens", 0, "Max new tokens"), ("max_new_tokens", 2.5, "Max new tokens"),
    ("max_new_tokens", "many", "Max new tokens"), ("max_new_tokens", None, "Max new tokens"),
    ("max_new_tokens", engine.MAX_NEW_TOKENS + 1, "Max new tokens"), ("max_new_tokens", True, "Max new tokens"),
    ("budget", 0, "Budget"), ("budget", float("nan"), "Budget"), ("budget", engine.MAX_BUDGET + 1, "Budget"),
    ("steps", -1, "Steps"), ("steps", 1.5, "Steps"), ("steps", engine.MAX_STEPS + 1, "Steps"),
    ("reuse", "fast", "Reuse"), ("fp_schedule", "zigzag", "Schedule"), ("sampler", "beam", "Sampler"),
    ("temperature", -1, "Temperature"), ("temperature", 1e-6, "Temperature"), ("temperature", "hot", "Temperature"),
    ("temperature", float("inf"), "Temperature"), ("temperature", None, "Temperature"),
    ("seed", -1, "Seed"), ("seed", 2**64, "Seed"), ("seed", "abc", "Seed"),
    ("delay_ms", -5, "Slow motion"), ("delay_ms", engine.MAX_DELAY_MS + 1, "Slow motion"),
]


@pytest.mark.parametrize("field,value,label", BAD_FIELDS)
def test_a_bad_field_is_named_with_what_it_accepts(field, value, label):
    fields = dict(GOOD, prompt="ROMEO:", suffix="", max_new_tokens=8, sampler="ancestral")
    fields[field] = value
    with pytest.raises(SettingsError) as err:
        engine.parse_text_request(**fields)
    assert str(err.value).startswith(label) and ("from" in str(err.value) or "one of" in str(err.value)
                                                 or "characters" in str(err.value)), str(err.value)


def test_the_page_values_parse_as_the_fields_mean():
    request = engine.parse_text_request(None, None, "16", budget=" 96 ", steps="", reuse="none",
                                        fp_schedule="fixed", temperature="0", seed=7.0, delay_ms=None)
    assert (request.prompt, request.suffix, request.max_new_tokens) == ("", "", 16)
    s = request.settings
    assert (s.budget, s.steps, s.temperature, s.seed, s.delay_ms, s.sampler) == (96, None, 0.0, 7, 0, None)
    assert engine.parse_settings(**dict(GOOD, steps=12)).steps == 12


def test_a_budget_too_small_for_the_steps_names_both(models):
    settings = engine.parse_settings(**dict(GOOD, budget=5, steps=4))
    with pytest.raises(SettingsError, match=r"^Budget / Steps for tiny-fp-mdlm: `budget`=5 is below the minimum"):
        engine.step_plan(models.models["tiny-fp-mdlm"], settings)


def test_image_classes_must_be_the_models(models):
    loaded = models.models["tiny-fp-maskgit"]
    for bad in ([], None, ["cat"], "9: nope"):
        with pytest.raises(SettingsError, match="^Classes: tick at least one of"):
            engine.parse_image_request(loaded, bad, 1, **GOOD)
    with pytest.raises(SettingsError, match="^Samples per class"):
        engine.parse_image_request(loaded, [loaded.class_names[0]], 0, **GOOD)
    with pytest.raises(SettingsError, match="^Guidance scale"):
        engine.parse_image_request(loaded, [loaded.class_names[0]], 1, guidance_scale=-1, **GOOD)


# ------------------------------------------------------------------------------------------------ runs


def test_a_text_run_streams_every_step_and_equals_generate(models):
    loaded = models.models["tiny-fp-mdlm"]
    mask = loaded.model.config.mask_token_id
    frames, result = run(engine.stream_text(loaded, text_request(delay_ms=1)))  # paced: every step is shown
    assert [f.step for f in frames] == list(range(1, 13)) and {f.total for f in frames} == {12}  # 72 / (2 + 4)
    masks = [int((f.canvas == mask).sum()) for f in frames]
    assert masks[0] > 0 and masks == sorted(masks, reverse=True) and masks[-1] == 0
    for f in frames:  # a revealed token never changes, the prompt never changes
        kept = f.previous != mask
        assert torch.equal(f.canvas[kept], f.previous[kept])
        assert loaded.tokenizer.decode(f.canvas[0, :6].tolist()) == "ROMEO:"
    assert not (result.canvas == mask).any() and result.block_passes <= 72 and result.num_steps == 12
    assert len(result.iterations) == len(result.residuals) == 12 and result.wall_s > 0
    ids = loaded.tokenizer("ROMEO:", add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = loaded.model.generate(ids, max_new_tokens=24, budget=72, reuse="3sr", sampler="ancestral",
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(result.canvas, expected)  # the page shows what the library makes, nothing else
    live = [f.live[-1] for f in frames]
    assert [x[0] for x in live if x[0] is not None] == [x for x in result.iterations if x is not None]
    fast, again = run(engine.stream_text(loaded, text_request(delay_ms=0)))  # unpaced: may skip to the newest
    steps = [f.step for f in fast]
    assert steps == sorted(set(steps)) and steps[-1] == 12 and torch.equal(again.canvas, result.canvas)
    assert len(fast[-1].live) == 12


def test_same_seed_same_text_and_the_seed_matters(models):
    loaded = models.models["tiny-fp-mdlm"]
    first = run(engine.stream_text(loaded, text_request(seed=3)))[1].canvas
    assert torch.equal(first, run(engine.stream_text(loaded, text_request(seed=3)))[1].canvas)
    assert not torch.equal(first, run(engine.stream_text(loaded, text_request(seed=4)))[1].canvas)


def test_infilling_keeps_prompt_and_suffix_and_fills_the_gap(models):
    loaded = models.models["tiny-mdlm"]
    _, result = run(engine.stream_text(loaded, text_request("ROMEO:", " the end", 10)))
    text = render.decoded_text(loaded, result.canvas[0])
    assert text.startswith("ROMEO:") and text.endswith(" the end") and len(result.canvas[0]) == 6 + 10 + 8
    assert result.iterations[0] in (0, None)  # no fixed-point layers: nothing to iterate
    with pytest.raises(SettingsError, match="^Max new tokens / Suffix"):
        engine.text_canvas(loaded, text_request("ROMEO:", " the end", 200))


def test_an_empty_prompt_starts_at_a_document_boundary(models):
    loaded = models.models["tiny-fp-mdlm"]
    frames, result = run(engine.stream_text(loaded, text_request("", max_new_tokens=12, delay_ms=1)))
    assert result.canvas.shape == (1, 13) and int(result.canvas[0, 0]) == loaded.tokenizer.bos_token_id
    page = render.canvas_html(loaded, frames[0].canvas[0], frames[0].previous[0], result.initial[0], "t", "c")
    assert page.count('class="tok ') == 13


def test_long_outputs_are_decoded_in_blocks(models):
    loaded = models.models["tiny-fp-mdlm"]  # context 128: 200 new tokens take blocks of 64
    frames, result = run(engine.stream_text(loaded, text_request(max_new_tokens=200, budget=24)))
    # 4 steps per block; the page may skip frames when it falls behind a busy machine, never add any
    assert result.num_blocks == 4 and frames[0].total == 4 * 4 and 1 <= len(frames) <= 4 * 4
    assert not (result.canvas == loaded.model.config.mask_token_id).any()


def test_pacing_slows_the_display_not_the_model(models):
    loaded = models.models["tiny-fp-mdlm"]
    start = time.perf_counter()
    _, result = run(engine.stream_text(loaded, text_request(delay_ms=40, budget=36)))  # 6 steps
    assert time.perf_counter() - start >= 5 * 0.04 and result.wall_s < time.perf_counter() - start


def test_closing_the_stream_stops_the_worker(models):
    loaded, stop = models.models["tiny-fp-mdlm"], threading.Event()
    stream = engine.stream_text(loaded, text_request(max_new_tokens=120, budget=600, delay_ms=0), stop)
    assert next(stream).step >= 1
    stream.close()
    assert stop.is_set()
    deadline = time.time() + 10
    while any(t.name == "generate-tiny-fp-mdlm" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "generate-tiny-fp-mdlm" for t in threading.enumerate())
    assert not loaded.model._forward_hooks  # the live-stats hook is gone


def test_an_error_inside_generate_reaches_the_caller(models, monkeypatch):
    loaded = models.models["tiny-fp-mdlm"]
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        list(engine.stream_text(loaded, text_request()))


def test_an_image_run_resolves_the_grid(models):
    loaded = models.models["tiny-fp-maskgit"]
    request = engine.parse_image_request(loaded, list(loaded.class_names[:3]), 2, guidance_scale=2.0, **GOOD)
    frames, result = run(engine.stream_images(loaded, request))
    assert result.canvas.shape == (6, 49) and not (result.canvas == 16).any() and len(frames) == result.num_steps
    grid = render.image_grid(loaded, frames[0].canvas, frames[0].previous, 2)
    assert grid.shape == (2 * 30 * 4 + 8, 3 * 30 * 4 + 8, 3) and grid.dtype.name == "uint8"
    assert not (render.image_grid(loaded, result.canvas, result.canvas, 2) == grid).all()


# --------------------------------------------------------------------------------------------- drawing


def test_the_canvas_marks_masks_new_tokens_and_escapes_text(models):
    loaded = models.models["tiny-fp-mdlm"]
    tok, mask = loaded.tokenizer, loaded.model.config.mask_token_id
    ids = tok("<b>&", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    initial = torch.cat([ids[:1], torch.full((3,), mask)])
    previous = initial.clone()
    now = torch.cat([ids[:1], ids[1:3], torch.tensor([mask])])
    page = render.canvas_html(loaded, now, previous, initial, "A <title>", "canvas-a")
    assert page.count(render.MASK_GLYPH) == 1 and 'data-masks="1"' in page
    assert page.count("tok-new") == 2 and page.count("tok-fixed") == 1 and page.count("tok-mask") == 1
    assert "<b>" not in page and "&lt;" in page and "A &lt;title&gt;" in page


def test_the_solver_plot_and_the_table(models):
    loaded = models.models["tiny-fp-mdlm"]
    results = [run(engine.stream_text(m, text_request())) [1] for m in (loaded, models.models["tiny-mdlm"])]
    fig = render.solver_figure(results)
    assert [line.get_label() for line in fig.axes[0].lines if not line.get_label().startswith("_")] == [
        "tiny-fp-mdlm", "tiny-mdlm"]
    assert len(fig.axes[1].lines) == 1  # the MDLM has no residual to draw
    table = render.summary_markdown(results)
    assert "| tiny-fp-mdlm | 12 x 1 |" in table and "(72)" in table


# -------------------------------------------------------------------------------------------- loading


def test_load_problems_are_named_and_the_rest_still_served(models, tmp_path):
    (tmp_path / "empty").mkdir()
    no_tokenizer = tmp_path / "no-tok"
    models.models["tiny-fp-mdlm"].model.save_pretrained(no_tokenizer)
    with pytest.raises(LoadError, match="does not exist"):
        engine.load_model(str(tmp_path / "missing"))
    with pytest.raises(LoadError, match="not a loadable fpmgm model folder"):
        engine.load_model(str(tmp_path / "empty"))
    with pytest.raises(LoadError, match="no usable tokenizer files"):
        engine.load_model(str(no_tokenizer))
    loaded = DemoModels.load([str(tmp_path / "missing"), models.models["tiny-mdlm"].path], log=lambda *_: None)
    assert list(loaded.models) == ["tiny-mdlm"] and len(loaded.problems) == 1


def test_hub_models_are_fetched_as_files_only(models, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: asked.append(repo) or models.models[
        "tiny-mdlm"].path)
    loaded = engine.load_model("hf://someone/tiny-mdlm")
    assert asked == ["someone/tiny-mdlm"] and loaded.name == "someone/tiny-mdlm" and loaded.kind == "text"

    def offline(repo):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LoadError, match=r"^'hf://a/b': could not download 'a/b' from the Hub: OSError: no network"):
        engine.load_model("hf://a/b")


def test_the_space_requirements_follow_the_project():
    """requirements.txt (what a Space installs) lists every runtime dependency of pyproject.toml and the demo's."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for d in project["optional-dependencies"]["demo"] if "gradio" not in d]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln and not ln.startswith(("#", "--"))) == sorted(wanted)


def test_default_models_are_the_demos_when_it_made_them(tmp_path, monkeypatch):
    assert engine.default_model_paths(tmp_path) == []
    for sub in (engine.DEMO_MODEL, engine.DEMO_TEACHER):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "config.json").write_text("{}")
    assert engine.default_model_paths(tmp_path) == [str(tmp_path / engine.DEMO_MODEL),
                                                    str(tmp_path / engine.DEMO_TEACHER)]
    monkeypatch.setenv(app.MODELS_ENV, "a, b")
    assert app.model_paths(app.parse_args([])) == ["a", "b"]
    assert app.model_paths(app.parse_args(["--model", "c"])) == ["c"]
    with pytest.raises(SystemExit):
        app.parse_args(["--port", "0"])


# ------------------------------------------------------------------------------------- page handlers


def text_page(models, **overrides):
    fields = dict(model_name="tiny-fp-mdlm", compare_name=app.NONE, prompt="ROMEO:", suffix="", max_new_tokens=16,
                  sampler="ancestral", **GOOD)
    fields.update(overrides)
    settings = [fields.pop(name) for name in app.SETTING_NAMES]
    return list(app.TextTab(models).run(*fields.values(), *settings))


def test_the_text_handler_streams_then_shows_the_plot_and_the_table(models):
    updates = text_page(models, compare_name="tiny-mdlm")
    status, canvas_a, canvas_b, plot, summary, text_a, text_b = updates[-1]
    assert 'data-state="done"' in status and "tiny-mdlm" in summary and "tiny-fp-mdlm" in summary
    assert plot is not None and not isinstance(plot, dict)
    frames_b = [u[2] for u in updates if isinstance(u[2], str)]
    assert frames_b and 'data-masks="0"' in frames_b[-1] and "tiny-mdlm: done" in frames_b[-1]
    assert any('data-state="running"' in u[0] for u in updates if isinstance(u[0], str))


@pytest.mark.parametrize("field,value,label", [("temperature", -2, "Temperature"), ("seed", "x", "Seed"),
                                               ("model_name", "nope", "Model"), ("compare_name", "x", "Compare"),
                                               ("budget", 2, "Budget / Steps"), ("prompt", 5, "Prompt")])
def test_bad_input_gives_one_readable_message(models, field, value, label):
    (update,) = text_page(models, **{field: value})
    assert 'role="alert"' in update[0] and f">{label}" in update[0] and "Traceback" not in update[0]
    assert all(isinstance(u, dict) for u in update[1:])  # the rest of the page stays as it was


def test_a_failing_run_is_reported_and_the_next_one_works(models, monkeypatch):
    loaded = models.models["tiny-fp-mdlm"]
    real = loaded.model.generate
    monkeypatch.setattr(loaded.model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("out of cheese")))
    status = text_page(models)[-1][0]
    assert 'role="alert"' in status and "RuntimeError: out of cheese" in status and "Traceback" not in status
    monkeypatch.setattr(loaded.model, "generate", real)
    assert 'data-state="done"' in text_page(models)[-1][0]


def test_the_image_handler(models):
    tab, loaded = app.ImageTab(models), models.models["tiny-fp-maskgit"]
    updates = list(tab.run("tiny-fp-maskgit", list(loaded.class_names[:2]), 1, 2.0, *GOOD.values()))
    assert 'data-state="done"' in updates[-1][0] and updates[-1][1].shape[-1] == 3
    (bad,) = tab.run("tiny-fp-maskgit", [], 1, 2.0, *GOOD.values())
    assert "Classes" in bad[0] and 'role="alert"' in bad[0]


def test_a_page_without_models_says_how_to_make_one():
    config = json.dumps(app.build_demo(DemoModels()).get_config_file())
    assert "scripts/demo.sh" in config and "--tiny" in config


# ---------------------------------------------------------------------------------------- the real page

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# This machine's closed network refuses Chromium's background connections: switch them all off.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1400,1500")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python app.py --tiny --port N` in its own process group, stopped (and its children) whatever happens."""
    port, log_path = free_port(), tmp_path_factory.mktemp("server") / "app.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--tiny", "--port", str(port), "--threads", "1",
                                 "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, f"app.py did not serve {url} in 180 s:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{missing} not found: run scripts/setup.sh as root (it installs Debian's chromium and "
                    "chromium-driver), or `apt-get install chromium chromium-driver`.")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",):
        options.add_argument(flag)
    service = Service(CHROMEDRIVER)  # an explicit driver: Selenium Manager never downloads one
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(90)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            if service.process is not None and service.process.poll() is None:
                service.process.kill()


def wait_for(what: str, check, timeout: float = 90, every: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def set_number(driver, selector: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)  # Gradio commits a number field when it loses focus


def page_state(driver) -> dict:
    """One snapshot of the status line and both canvases, read in one script so that they belong together."""
    return driver.execute_script("""
        const status = document.querySelector('#status .fpmgm-status');
        const plot = document.querySelector('#solver-plot img');
        const canvas = (id) => {
            const c = document.querySelector(id);
            return c ? {masks: c.querySelectorAll('.tok-mask').length, tokens: c.querySelectorAll('.tok').length,
                        fresh: c.querySelectorAll('.tok-new').length, text: c.innerText,
                        shown: c.offsetParent !== null} : {masks: -1, tokens: 0, fresh: 0, text: '', shown: false};
        };
        return {state: status && status.dataset.state, status: status && status.innerText,
                a: canvas('#canvas-a'), b: canvas('#canvas-b'), plot: plot ? plot.naturalWidth : 0};""")


def filled(canvas: dict) -> bool:
    return canvas["tokens"] > 0 and canvas["masks"] == 0 and render.MASK_GLYPH not in canvas["text"]


WATCH_FRAMES = """
    // Record every canvas the page shows, however fast the frames come: the most masks and highlighted tokens seen.
    window.fpmgmSeen = {a: 0, fresh: 0, b: 0};
    const count = (sel) => document.querySelectorAll(sel).length;
    new MutationObserver(() => {
        const seen = window.fpmgmSeen;
        seen.a = Math.max(seen.a, count('#canvas-a .tok-mask'));
        seen.fresh = Math.max(seen.fresh, count('#canvas-a .tok-mask') ? count('#canvas-a .tok-new') : 0);
        seen.b = Math.max(seen.b, count('#canvas-b .tok-mask'));
    }).observe(document.body, {childList: true, subtree: true});"""


def generate_and_wait(driver, compare: bool) -> tuple[dict, dict]:
    """Click Generate and wait until the run is done and the canvases hold no mask marker; returns the final
    state and what the page showed on the way (`WATCH_FRAMES`)."""
    driver.execute_script(WATCH_FRAMES)
    driver.find_element("css selector", "#generate").click()

    def finished():
        state = page_state(driver)
        done = state["state"] == "done" and filled(state["a"]) and (filled(state["b"]) or not compare)
        return state if done else None

    final = wait_for("the canvases to fill (no mask marker left)", finished)
    return final, driver.execute_script("return window.fpmgmSeen;")


def test_the_page_in_a_real_browser(server, browser, tmp_path):
    """Set the budget, compare the FP-MDLM with the MDLM, watch both canvases fill, check the plot, save the
    screenshot; then a bad field gives a readable message and the next request still works."""
    url, log_path = server
    start = time.time()
    browser.get(url)
    wait_for("the page to load", lambda: browser.find_elements("css selector", "#generate"))
    set_number(browser, "#budget input[type=number]", 60)
    assert browser.find_element("css selector", "#budget input[type=range]").get_attribute("value") == "60"
    set_number(browser, "#delay input[type=number]", 100)  # slow enough to watch
    browser.find_element("css selector", "#compare input").click()
    browser.find_element("css selector", '#compare li[role=option][aria-label="tiny-mdlm"]').click()
    wait_for("the second canvas", lambda: page_state(browser)["b"]["shown"], timeout=30)

    final, seen = generate_and_wait(browser, compare=True)
    assert seen["a"] > 0, "no frame with masks was streamed"
    assert seen["fresh"] > 0, "no newly revealed token was highlighted while masks were left"
    assert seen["b"] > 0, "the compared model's canvas did not stream"
    assert "block passes" in final["status"] and "Traceback" not in browser.page_source
    summary = browser.find_element("css selector", "#summary").text
    assert "tiny-fp-mdlm" in summary and "tiny-mdlm" in summary and "(60)" in summary, summary  # the set budget
    wait_for("the residual plot to be drawn", lambda: page_state(browser)["plot"] > 100, timeout=30)

    shot = tmp_path / "app_screenshot.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FPMGM_APP_SCREENSHOT"):  # refresh the README's picture: FPMGM_APP_SCREENSHOT=docs/...
        shutil.copy(shot, os.environ["FPMGM_APP_SCREENSHOT"])

    set_number(browser, "#temperature input", -1)  # bad input: a readable message, never a stack trace
    browser.find_element("css selector", "#generate").click()
    error = wait_for("the error message", lambda: (s := page_state(browser))["state"] == "error" and s, timeout=30)
    assert error["status"].startswith("Temperature: enter 0 (greedy) or a number from 0.0001 to"), error["status"]
    assert browser.find_element("css selector", "#status [role=alert]") and "Traceback" not in browser.page_source

    set_number(browser, "#temperature input", 0.8)  # the server kept serving: the next request works
    assert filled(generate_and_wait(browser, compare=True)[0]["b"])
    assert "Traceback" not in log_path.read_text()
    print(f"browser test: {time.time() - start:.1f} s after the server was up")
