"""The demo (:mod:`lstmlab.demo`): the core function, the Gradio app through gradio_client, and a real headless
Chromium. The command's flags are tested in tests/commands/test_demo.py.

Under CI (``CI=true``) nothing here may skip: a missing gradio, selenium or chromium is a failure.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from trained import trained_run

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
pytest.importorskip("matplotlib")

IN_CI = os.environ.get("CI", "").lower() == "true"


def _require(module: str):
    """Import a test dependency: skip without it locally, fail under CI."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path):
    from lstmlab.checkpoint import load_checkpoint

    return load_checkpoint(trained_run(tmp_path_factory.getbasetemp(), mnist_dir) / "best.safetensors")


def seven(mode: str = "RGBA", size: int = 400, width: int = 22) -> Image.Image:
    """A 7 as the sketchpad sends it: black strokes on a transparent layer."""
    img = Image.new(mode, (size, size), (0, 0, 0, 0) if mode == "RGBA" else "white")
    s = size / 400
    ImageDraw.Draw(img).line([(100 * s, 80 * s), (300 * s, 80 * s), (170 * s, 340 * s)], fill="black",
                             width=round(width * s), joint="curve")
    return img


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# the core, without gradio


def test_predict_drawing(checkpoint, real_mnist: bool) -> None:
    from lstmlab.demo import DPI, FigureCache, input_picture, predict_drawing

    r = predict_drawing(checkpoint, {"background": None, "layers": [], "composite": seven()})
    assert r.ok and r.digit is not None and r.digit.shape == (28, 28)
    assert list(r.probabilities) == [str(k) for k in range(10)]
    assert abs(sum(r.probabilities.values()) - 1) < 1e-4
    top3 = sorted(r.probabilities, key=r.probabilities.get, reverse=True)[:3]
    if real_mnist:  # a model trained on the synthetic stand-in has never seen a digit
        assert "7" in top3, r.probabilities
    best = max(r.probabilities, key=r.probabilities.get)
    assert r.message.startswith(f"**Prediction: {best}**")
    assert r.steps and r.steps[0][0] == 1 and r.steps[-1][1] == best  # the guess story ends at the prediction
    for figure in (r.gates, r.evolution):
        assert figure.ndim == 3 and figure.shape[2] == 3 and figure.dtype == np.uint8
        assert figure.std() > 20  # not blank
    # the gates figure is its heatmaps only (the input and the guess are shown once, elsewhere on the page)
    assert r.gates.shape[1] == 17 * DPI and 6 * DPI < r.gates.shape[0] < 9 * DPI
    assert r.step_data is not None and r.step_data.steps == 28 and r.step_data.digit.shape == (28, 28)
    shown = input_picture(r.digit)  # the page's picture of the input: the very pixels the model read, enlarged
    assert shown.shape == (224, 224) and np.array_equal(shown[::8, ::8], r.digit.numpy())
    # A later drawing refills the same figures (only what changes is redrawn): the pixels equal a fresh drawing's.
    cache = FigureCache(checkpoint.permutation, list(r.probabilities), checkpoint.config.data.view)
    one = predict_drawing(checkpoint, np.asarray(seven("RGB", width=40)), figure_cache=cache)
    again = predict_drawing(checkpoint, {"composite": seven()}, figure_cache=cache)
    assert not np.array_equal(one.gates, again.gates)
    assert np.array_equal(again.gates, r.gates) and np.array_equal(again.evolution, r.evolution)
    # The same drawing as a PIL image, as an array, on white paper: the same answer.
    for drawing in (seven(), np.asarray(seven()), seven("RGB")):
        assert predict_drawing(checkpoint, drawing, figures=False).probabilities.keys() == r.probabilities.keys()
        assert max(predict_drawing(checkpoint, drawing, figures=False).probabilities.items(),
                   key=lambda kv: kv[1])[0] == best


def test_step_view_counts_rows_from_one(checkpoint) -> None:
    """The step view shows the rows read so far lit, the rest dimmed, the current one marked; the caption, the
    slider and the message all count rows from 1."""
    from lstmlab.demo import predict_drawing, render_step, step_caption

    r = predict_drawing(checkpoint, seven(), figures=False)
    data = r.step_data
    frames = {t: render_step(data, t) for t in (1, 12, 28)}
    assert len({f.shape for f in frames.values()}) == 1 and frames[1].dtype == np.uint8
    assert not np.array_equal(frames[1], frames[12]) and not np.array_equal(frames[12], frames[28])
    assert np.array_equal(render_step(data, 0), frames[1]) and np.array_equal(render_step(data, 99), frames[28])
    digit = data.digit.astype(np.float32)
    top, scale = 24, 8  # where the input sits in the frame, and its magnification
    shown = frames[12][top + 4 : top + 224 : scale, 4:224:scale, 1].astype(np.float32)  # one pixel per input pixel
    assert np.abs(shown[:11] - digit[:11]).max() <= 1  # rows 1..11 read: as the model sees them
    assert np.abs(shown[12:] - (0.3 * digit[12:] + 40)).max() <= 1  # rows 13..28 not read yet: dimmed
    red = frames[12][top + 11 * scale, 100]
    assert tuple(red) == (230, 30, 30)  # row 12 (index 11) is framed in red
    assert step_caption(data, 12).startswith("**Row 12 of 28**")
    assert step_caption(data, 1).startswith("**Row 1 of 28**")
    word, first = r.message.split("after ")[1].split(":")[0].split()
    # the message tells the last six changes: its first is steps[-6] when the guess changed more often
    assert (word, first) == ("row", str(r.steps[-6:][0][0])) and r.steps[0][0] == 1


@pytest.mark.parametrize("view", ["pixels", "permuted"])
def test_step_view_of_a_pixel_model(tmp_path: Path, view: str) -> None:
    """A pixel-by-pixel model (784 steps): the step view lights the pixels read so far, in the
    order the model reads them, and counts pixels from 1."""
    import torch

    from lstmlab.checkpoint import load_checkpoint, save_checkpoint
    from lstmlab.config import Config, DataConfig, ModelConfig
    from lstmlab.data import make_permutation
    from lstmlab.demo import predict_drawing, render_step, step_caption
    from lstmlab.model import SequenceClassifier

    torch.manual_seed(0)
    config = Config(model=ModelConfig(input_size=1, hidden_size=8, backend="torch"),
                    data=DataConfig(view=view, mean=0.13, std=0.31))
    path = tmp_path / "pixels.safetensors"
    save_checkpoint(path, SequenceClassifier(config.model), config, make_permutation(3) if view == "permuted" else None)
    ckpt = load_checkpoint(path)
    r = predict_drawing(ckpt, seven(), figures=False)
    data = r.step_data
    assert r.ok and data.steps == 784 and data.probs.shape == (784, 10)
    frame = render_step(data, 400)
    order = np.arange(784) if view == "pixels" else ckpt.permutation.numpy()
    read = np.zeros(784, bool)
    read[order[:400]] = True
    shown = frame[24 + 4 : 24 + 224 : 8, 4:224:8, 1].astype(np.float32).ravel()
    digit = data.digit.astype(np.float32).ravel()
    current = order[399]
    lit = read.copy()
    lit[current] = False  # the pixel being read is painted red
    assert np.abs(shown[lit] - digit[lit]).max() <= 1 and np.abs(shown[~read] - (0.3 * digit[~read] + 40)).max() <= 1
    assert step_caption(data, 400).startswith("**Pixel 400 of 784**")
    assert render_step(data, 784).shape == frame.shape


def test_painted_figure_matches_matplotlibs(checkpoint) -> None:
    """The demo paints the heatmaps' pixels itself; the picture is matplotlib's but for anti-aliased edges."""
    from lstmlab.analysis.figures import figure_to_array
    from lstmlab.analysis.gates import GatesFigure
    from lstmlab.analysis.inputs import class_names, model_input, preprocess_image
    from lstmlab.analysis.recording import record
    from lstmlab.demo import DPI

    digit = preprocess_image(seven())
    rec = record(checkpoint.model, model_input(checkpoint, digit[None]))
    names = class_names(checkpoint.config.data.dataset)
    painted = GatesFigure(rec, digit, "rows", names, dpi=DPI, live_title=False).to_array()
    drawn = figure_to_array(GatesFigure(rec, digit, "rows", names, dpi=DPI, live_title=False).fig)
    assert painted.shape == drawn.shape
    far = np.abs(painted.astype(int) - drawn.astype(int)).max(-1) > 40
    assert far.mean() < 0.01, far.mean()


@pytest.fixture(scope="session")
def variant_checkpoint(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path):
    """A tiny peephole LSTM with zoneout, trained for a few seconds: its peepholes have moved off their zero init."""
    import torch

    from lstmlab.checkpoint import load_checkpoint
    from lstmlab.config import Config, DataConfig, ModelConfig, TrainConfig
    from lstmlab.training import train

    out = tmp_path_factory.mktemp("variant-run")
    config = Config(model=ModelConfig(hidden_size=16, cell="peephole", zoneout=0.1),
                    data=DataConfig(val_size=500, augment_shift=0),
                    train=TrainConfig(lr=3e-3, batch_size=64, iterations=40, eval_every=40, clip=None, device="cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: threads only spin against each other on a shared machine
    try:
        train(config, out, data_dir=mnist_dir, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return load_checkpoint(out / "best.safetensors")


def test_demo_shows_a_variant_models_own_terms(variant_checkpoint) -> None:
    """The step view and the gates figure of a variant model add its own panels (peepholes, zoneout) below the six
    gates, in more rows; refilled figures equal new ones."""
    from lstmlab.analysis.gates import PANELS
    from lstmlab.demo import DPI, STEP_PANEL, FigureCache, predict_drawing, render_step

    own = ["peep_i", "peep_f", "peep_o", "zone_c", "zone_h"]
    r = predict_drawing(variant_checkpoint, seven())
    data = r.step_data
    assert r.ok and list(data.values) == [*PANELS, *own]
    assert all(data.values[name].shape == (16, 28) for name in own) and np.abs(data.values["peep_f"]).max() > 0
    frame = render_step(data, 12)
    pw, ph = STEP_PANEL
    assert frame.shape[0] == 4 * (ph + 40) + 24  # two rows of gates, two of the variant's terms
    x0, top = 224 + 24, 24 + 16 + 3 * (ph + 40)  # the fourth row: zone_c, then zone_h
    zone_c = frame[top : top + ph, x0 : x0 + pw]
    assert (zone_c != 235).any(-1)[:, : pw * 11 // 28].mean() > 0.9  # rows 1..11 painted
    assert (zone_c[:, pw * 12 // 28 + 1 :] == 235).all()  # rows 13.. not read yet
    assert 14 * DPI < r.gates.shape[0] < 17 * DPI  # the heatmaps: the six gates and two rows more
    cache = FigureCache(None, [str(k) for k in range(10)], "rows")
    predict_drawing(variant_checkpoint, seven(width=40), figure_cache=cache)
    again = predict_drawing(variant_checkpoint, seven(), figure_cache=cache)
    assert np.array_equal(again.gates, r.gates)


def test_predict_drawing_from_many_threads(checkpoint) -> None:
    """The server runs several drawings at once: with one shared figure cache, each answer and figure is the one
    the same drawing gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from lstmlab.demo import FigureCache, predict_drawing

    def cache() -> FigureCache:
        return FigureCache(checkpoint.permutation, [str(k) for k in range(10)], checkpoint.config.data.view)

    drawings = [seven(width=w) for w in (10, 16, 22, 30, 38, 46)] * 2
    alone = [predict_drawing(checkpoint, d, figure_cache=cache()) for d in drawings[:6]]
    shared = cache()
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda d: predict_drawing(checkpoint, d, figure_cache=shared), drawings))
    for k, r in enumerate(together):
        expected = alone[k % 6]
        assert r.ok and r.probabilities == expected.probabilities and r.message == expected.message
        assert np.array_equal(r.gates, expected.gates) and np.array_equal(r.evolution, expected.evolution)


def test_drawing_size_cap(checkpoint) -> None:
    from lstmlab.demo import MAX_DRAWING_PIXELS, predict_drawing

    huge = Image.new("L", (2500, 2000), 255)  # 5 MP: over the demo's cap, under the CLI's 40 MP
    assert 2500 * 2000 > MAX_DRAWING_PIXELS
    r = predict_drawing(checkpoint, huge)
    assert not r.ok and "over the demo's 4,000,000-pixel limit" in r.message and r.gates is None


def test_predict_drawing_blank_and_odd_inputs(checkpoint) -> None:
    from lstmlab.demo import BLANK_MESSAGE, predict_drawing

    blank_inputs = [None, {"background": None, "layers": [], "composite": None},
                    {"composite": Image.new("RGBA", (400, 400), (0, 0, 0, 0))},
                    {"composite": Image.new("RGB", (400, 400), "white")}, np.full((50, 50, 3), 255, np.uint8)]
    for drawing in blank_inputs:
        r = predict_drawing(checkpoint, drawing)
        assert not r.ok and r.message == BLANK_MESSAGE and r.digit is None and r.gates is None
    r = predict_drawing(checkpoint, np.zeros((0, 5), np.uint8))
    assert not r.ok and r.message.startswith("Cannot read the drawing")


# ---------------------------------------------------------------------------------------------
# the app, served for real


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """The app on 127.0.0.1 at a free port, served from a thread for the module's tests."""
    _require("gradio")
    from lstmlab.demo import build_app, launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # served files stay in the test's tmp
        app = build_app(checkpoint)
        url = launch(app, "127.0.0.1", _free_port(), block=False)
        assert url.startswith("http://127.0.0.1:")
        yield url
        app.close()


def test_busy_port_is_a_one_line_error(checkpoint) -> None:
    _require("gradio")
    from lstmlab.demo import build_app, launch
    from lstmlab.errors import LstmlabError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LstmlabError, match=f"cannot serve on 127.0.0.1:{port} .*pick another --port"):
            launch(build_app(checkpoint), "127.0.0.1", port, block=False)


def test_app_through_gradio_client(served: str, tmp_path: Path, real_mnist: bool) -> None:
    client_mod = _require("gradio_client")
    client = client_mod.Client(served, verbose=False)
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (400, 400), (0, 0, 0, 0)).save(blank)
    drawn = tmp_path / "seven.png"
    seven().save(drawn)

    def editor(path: Path) -> dict:
        return {"background": None, "layers": [], "composite": client_mod.handle_file(str(path)), "id": None}

    # gradio sends an empty Label as {}
    step_view, label, evolution, gates, message, _, caption, seen = client.predict(editor(blank), api_name="/predict")
    assert (step_view, evolution, gates, seen) == (None, None, None, None) and not label
    assert "blank" in message and not caption
    # The app keeps serving after a blank canvas.
    step_view, label, evolution, gates, message, slider, caption, seen = client.predict(editor(drawn),
                                                                                        api_name="/predict")
    assert slider["value"] == 28 and caption.startswith("**Row 28 of 28**")  # the step view opens at the last row
    assert len(label["confidences"]) >= 3
    if real_mnist:  # a model trained on the synthetic stand-in has never seen a digit
        assert "7" in [c["label"] for c in label["confidences"]]
    assert message.startswith(f"**Prediction: {label['label']}**")
    for path in (step_view, evolution, gates):
        with Image.open(path) as img:
            assert np.asarray(img.convert("L")).std() > 20
    with Image.open(seen) as img:  # the 28x28 input the model read, each pixel an 8x8 square
        shown = np.asarray(img.convert("L"))
    assert shown.shape == (224, 224) and (shown[::8, ::8] > 128).sum() >= 20


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "headless test needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    if IN_CI:
        pytest.fail(f"CI=true but {message}; .ci/browser.sh should have installed them")
    pytest.skip(message)


def test_app_in_headless_chromium(served: str, tmp_path: Path, real_mnist: bool) -> None:
    browser, driver_path = _chromium()
    webdriver = _require("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(dir=tmp_path)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1700", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        chrome.get(served)
        wait = WebDriverWait(chrome, 90)
        wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#sketchpad canvas") if c.is_displayed()])

        def message() -> str:
            return chrome.find_element(By.CSS_SELECTOR, "#message").text

        def caption() -> str:
            return chrome.find_element(By.CSS_SELECTOR, "#step-caption").text

        def brush_selected() -> bool:
            brush = chrome.find_element(By.CSS_SELECTOR, "#sketchpad button[aria-label='Brush']")
            return "highlight" in (brush.get_attribute("class") or "")

        def draw_seven() -> None:
            canvas = [c for c in chrome.find_elements(By.CSS_SELECTOR, "#sketchpad canvas") if c.is_displayed()][-1]
            stroke = ActionChains(chrome).move_to_element_with_offset(canvas, -60, -70).click_and_hold()
            for x, y in [(-20, -70), (20, -70), (60, -70), (40, -20), (20, 30), (0, 80)]:  # a 7, from the centre
                stroke.move_to_element_with_offset(canvas, x, y)
            stroke.release().perform()
            time.sleep(0.5)  # let the canvas commit the stroke before reading it

        chrome.find_element(By.CSS_SELECTOR, "#read-button").click()  # nothing drawn yet
        wait.until(lambda d: "blank" in message())

        wait.until(lambda d: brush_selected())  # the page opens with the brush picked: drawing works at once
        draw_seven()
        chrome.find_element(By.CSS_SELECTOR, "#read-button").click()
        wait.until(lambda d: "Prediction" in message())
        predicted = message().split("Prediction:")[1].split()[0]
        label_lines = chrome.find_element(By.CSS_SELECTOR, "#prediction").text.split()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gates img"))
        wait.until(lambda d: caption().startswith("Row 28 of 28"))

        # scrub: the caption and the step view follow the slider, counted from 1
        slider = chrome.find_element(By.CSS_SELECTOR, "#step-slider input[type=range]")
        number = chrome.find_element(By.CSS_SELECTOR, "#step-slider input[type=number]")
        view_before = chrome.find_element(By.CSS_SELECTOR, "#step-view img").get_attribute("src")
        slider.send_keys(Keys.HOME)
        for _ in range(6):
            slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: number.get_attribute("value") == "7")
        wait.until(lambda d: caption().startswith("Row 7 of 28"))
        wait.until(lambda d: chrome.find_element(By.CSS_SELECTOR, "#step-view img").get_attribute("src")
                   != view_before)
        time.sleep(0.5)
        shot = tmp_path / "demo.png"
        chrome.save_screenshot(str(shot))

        # play: the rows go by, one after the other, up to the last
        chrome.find_element(By.CSS_SELECTOR, "#play-button").click()
        seen = set()

        def played(d) -> bool:
            seen.add(caption().split(" of ")[0])
            return caption().startswith("Row 28 of 28")

        WebDriverWait(chrome, 90, poll_frequency=0.05).until(played)
        assert len(seen) >= 5, seen  # several rows were shown on the way, not just the end
        assert number.get_attribute("value") == "28"

        # the trash button clears the canvas and every answer, and keeps the brush
        chrome.find_element(By.CSS_SELECTOR, "#sketchpad button[aria-label='Clear canvas']").click()
        wait.until(lambda d: not message() and not caption())
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#gates img")
                   and not d.find_elements(By.CSS_SELECTOR, "#step-view img"))
        wait.until(lambda d: brush_selected())
        draw_seven()  # with no tool re-picked by hand
        chrome.find_element(By.CSS_SELECTOR, "#read-button").click()
        wait.until(lambda d: "Prediction" in message() or "blank" in message())
        assert "Prediction" in message(), message()
        if os.environ.get("LSTMLAB_SCREENSHOT_DIR"):  # to look at it by eye
            shutil.copy(shot, Path(os.environ["LSTMLAB_SCREENSHOT_DIR"]) / "demo-chromium.png")
    finally:
        chrome.quit()
    assert predicted in [str(k) for k in range(10)]
    if real_mnist:  # a model trained on the synthetic stand-in has never seen a digit
        assert "7" in label_lines[:8], label_lines  # the label shows the top 3 classes; the drawn 7 is among them
    with Image.open(shot) as img:
        assert np.asarray(img.convert("L")).std() > 20
