"""The browser app end to end: ``python -m PPCRegistrationWeb`` served on a free port and driven by headless
Chromium (Debian's ``chromium`` through Playwright): the sample CT, a simulated case at 10 mm, Run to the end
(final mTRE shown < 2 mm, the X-ray view not blank and changed), the downloads, Stop within one update, Reset,
bad uploads (a clear message, the loaded case kept) and a second tab (a "busy" page).

Screenshots go to ``output/web_app/`` ($PPCREG_WEB_SCREENSHOTS).  Skips with a message where no Chromium is
installed (``apt-get install chromium``; ``.ci/run`` installs it) or trame-slicer / Playwright are missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("PPCREG_WEB_SCREENSHOTS", ROOT / "output" / "web_app"))
CHROMIUM = os.environ.get("PPCREG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
UPLOAD_LIMIT_MB = 5
RUN_TIMEOUT_MS = 240_000

pytest.importorskip("trame_slicer", reason="the browser app needs trame-slicer (requirements-app.txt)")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (requirements-test)")
if CHROMIUM is None:
    pytest.skip("no Chromium found: install it (apt-get install chromium) or set PPCREG_CHROMIUM",
                allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(chest_ct_paths):
    """The app on a free port (the sample CT is already in the cache: ``chest_ct_paths``)."""
    port = _free_port()
    env = dict(os.environ, PPCREG_THREADS="1", OMP_NUM_THREADS="1")
    if not env.get("DISPLAY"):
        env.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "PPCRegistrationWeb", "--port", str(port),
                             "--upload-limit-mb", str(UPLOAD_LIMIT_MB)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    t0 = time.monotonic()
    try:
        line = ""
        while "served at" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode} before serving")
            if time.monotonic() - t0 > 120:
                pytest.fail("the app did not start within 120 s")
        print(f"served in {time.monotonic() - t0:.1f} s: {line.strip()}")
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    OUT.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server)
    pg.wait_for_selector("#controls", timeout=60_000)
    pg.errors = errors
    yield pg
    context.close()


def _text(page, selector: str) -> str:
    return page.inner_text(selector).strip()


def _wait_text(page, selector: str, predicate_js: str, timeout: int = 120_000) -> None:
    """Wait until the text ``t`` of ``selector`` satisfies the JS expression ``predicate_js``."""
    page.wait_for_function(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                           f"if (!e) return false; const t = e.innerText.trim(); return {predicate_js}; }})()",
                           timeout=timeout)


def _xray_view(page) -> np.ndarray:
    """The X-ray view (the first Slicer view of the layout) as an RGB array, from the browser's rendering."""
    from PIL import Image

    png = page.locator("#views .layout-grid-item").first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def _settle(page, seconds: float = 1.5) -> None:
    """Let the streamed views catch up (they are re-encoded a few times a second)."""
    page.wait_for_timeout(int(seconds * 1000))


def _mm(text: str) -> float:
    return float(text.replace("mm", "").strip())


def _mtre_shown(page) -> float:
    return _mm(_text(page, "#status-mtre"))


def _iteration(page) -> int:
    t = _text(page, "#status-iteration")
    return int(t.split()[0]) if t and t[0].isdigit() else 0


def test_registers_the_sample_case_in_the_browser(page):
    t0 = time.monotonic()
    page.click("#load-sample")
    _wait_text(page, "#ct-desc", "t.includes('sample chest CT')")
    page.click("#simulate")
    _wait_text(page, "#case-desc", "t.includes('simulated X-ray of T8')")
    _wait_text(page, "#status-mtre", "t.endsWith('mm')")
    assert abs(_mtre_shown(page) - 10.0) < 0.01
    _settle(page)
    before = _xray_view(page)
    page.screenshot(path=str(OUT / "page_before.png"))
    t_run = time.monotonic()
    page.click("#run")
    _wait_text(page, "#status-state", "!['-', 'running', 'initial estimate'].includes(t)", RUN_TIMEOUT_MS)
    run_s = time.monotonic() - t_run
    _settle(page, 2.5)
    after = _xray_view(page)
    page.screenshot(path=str(OUT / "page_after.png"))
    final = _mtre_shown(page)
    print(f"sample case: 10 -> {final:.2f} mm ({_text(page, '#status-state')}), Run {run_s:.1f} s, "
          f"from load {time.monotonic() - t0:.1f} s; {_text(page, '#info')}")
    assert _text(page, "#status-state") == "converged", _text(page, "#info")
    assert final < 2.0
    # the X-ray view shows an image (not a blank canvas) and it changed between the initial and the final pose
    assert before.std() > 10 and after.std() > 10, "the X-ray view is blank"
    changed = np.abs(after - before).mean(-1)
    assert (changed > 20).mean() > 0.01, "the X-ray view did not change between the initial and final pose"
    # the plots and the ranked correspondences are there
    assert page.locator("#plot svg").count() == 1 and page.locator("#weights-hist svg").count() == 1
    assert page.locator("#ranked tbody tr").count() >= 5
    assert not page.errors, page.errors


def test_downloads_the_result(page, tmp_path):
    import slicer

    from PPCRegistrationLib.formats import load_transform

    with page.expect_download() as info:
        page.click("#dl-json")
    path = tmp_path / "transform.json"
    info.value.save_as(path)
    record = load_transform(path)
    T = record.matrix.numpy()
    assert record.frame == "RAS" and np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-6)
    with page.expect_download() as info:
        page.click("#dl-h5")
    h5 = tmp_path / "transform.h5"
    info.value.save_as(h5)
    # Slicer reads it back as the same transform
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(h5))
    assert storage.ReadData(node)
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(m)
    back = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])
    assert np.allclose(back, T, atol=1e-5)
    with page.expect_download() as info:
        page.click("#dl-png")
    png = tmp_path / "shot.png"
    info.value.save_as(png)
    from PIL import Image

    shot = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    assert shot.shape[1] > shot.shape[0] and shot.std() > 10  # both views side by side, not blank
    shutil.copy(png, OUT / "download_screenshot.png")


def test_stop_takes_effect_after_the_current_update_and_reset_restores(page):
    page.click("#reset")
    _wait_text(page, "#status-mtre", "t === '10.00 mm'")
    page.click("#run")
    _wait_text(page, "#status-iteration", "parseInt(t) >= 2")
    page.click("#stop")
    _wait_text(page, "#status-state", "t === 'stopped'", 60_000)
    _settle(page, 1.0)
    # the updates done when the server got Stop (the page's count lags by up to one update)
    at_stop = int(page.evaluate("() => document.querySelector('#stop-at').textContent"))
    assert at_stop >= 2 and _iteration(page) <= at_stop + 1, (at_stop, _iteration(page))
    assert "stopped" in _text(page, "#info")
    page.click("#reset")
    _wait_text(page, "#status-mtre", "t === '10.00 mm'")
    assert _text(page, "#status-state") == "initial estimate"


def _handle_centre(view: np.ndarray) -> tuple[float, float]:
    """The centre (x, y) of Slicer's transform handles in a screenshot of the X-ray view, where the disk that
    moves the pose in the plane is: a circle fitted to the flat pixels of the handles' grey (204; the ring
    around the disk; the X-ray and the DRR are textured), away from the view's gutter and slice slider."""
    g = view.mean(-1)
    flat = np.ones(g.shape, bool)
    for dy in (-2, 0, 2):
        for dx in (-2, 0, 2):
            flat &= np.abs(np.roll(np.roll(g, dy, 0), dx, 1) - g) < 1.5
    mask = flat & (np.abs(view - 204.0).max(-1) <= 8)
    mask[:40], mask[-40:] = False, False
    ys, xs = np.nonzero(mask)
    assert xs.size > 200, "no transform handles in the X-ray view"
    xs, ys = xs.astype(float), ys.astype(float)
    for _ in range(3):  # algebraic circle fit, then again on the points near the circle
        D, E, F = np.linalg.lstsq(np.c_[xs, ys, np.ones_like(xs)], -(xs ** 2 + ys ** 2), rcond=None)[0]
        cx, cy = -D / 2, -E / 2
        dist = np.abs(np.hypot(xs - cx, ys - cy) - np.sqrt(max(cx ** 2 + cy ** 2 - F, 0.0)))
        keep = dist < max(10.0, float(np.median(dist)))
        xs, ys = xs[keep], ys[keep]
    return float(cx), float(cy)


def test_the_pose_moves_by_dragging_the_handles_in_the_xray_view(page):
    _wait_text(page, "#status-mtre", "t === '10.00 mm'")
    _settle(page)
    x, y = _handle_centre(_xray_view(page))
    box = page.locator("#views .layout-grid-item").first.bounding_box()
    x, y = box["x"] + x, box["y"] + y
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x + 4 * k, y + 2 * k)
        page.wait_for_timeout(60)
    page.mouse.up()
    _wait_text(page, "#info", "t.includes('Initial pose moved')", 30_000)
    assert abs(_mtre_shown(page) - 10.0) > 0.1, "the drag did not move the pose in the detector plane"
    # the new initial pose is where Reset returns; the sliders hold its offsets
    moved = _text(page, "#status-mtre")
    page.click("#reset")
    page.wait_for_timeout(1000)
    assert _text(page, "#status-mtre") == moved
    page.screenshot(path=str(OUT / "page_dragged.png"))


def test_bad_uploads_give_a_message_and_keep_the_case(page, tmp_path):
    ct_before, case_before = _text(page, "#ct-desc"), _text(page, "#case-desc")
    # a file that is not an image, named as a CT
    junk = tmp_path / "ct.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file" * 100)
    page.set_input_files("#upload-ct", str(junk))
    page.wait_for_selector("#error", state="visible", timeout=60_000)
    message = _text(page, "#error")
    assert "ct.nii.gz" in message and "/tmp" not in message, message
    assert _text(page, "#ct-desc") == ct_before and _text(page, "#case-desc") == case_before
    # a 3D image given as the X-ray
    import SimpleITK as sitk

    vol = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.Image([16, 16, 8], sitk.sitkFloat32), str(vol))
    page.set_input_files("#upload-xray", str(vol))
    _wait_text(page, "#error", "t.includes('3D')", 60_000)
    assert _text(page, "#case-desc") == case_before
    # over the upload limit: refused in the page before it is sent
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * ((UPLOAD_LIMIT_MB + 1) * 1024 * 1024))
    page.set_input_files("#upload-xray", str(big))
    _wait_text(page, "#error", "t.includes('over the upload limit')", 30_000)
    assert _text(page, "#case-desc") == case_before
    # the case still registers: one update
    page.click("#step")
    _wait_text(page, "#status-iteration", "parseInt(t) >= 1", 60_000)
    page.screenshot(path=str(OUT / "page_bad_upload.png"))


def test_an_xray_without_tags_takes_the_pages_geometry_and_a_box_region(page, tmp_path):
    import SimpleITK as sitk

    png = tmp_path / "fluoro.png"
    arr = (np.random.default_rng(0).random((160, 200)) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(png))
    case_before = _text(page, "#case-desc")
    page.set_input_files("#upload-xray", str(png))
    _wait_text(page, "#error", "t.includes('X-ray geometry')", 60_000)  # a PNG has no spacing, no C-arm
    assert _text(page, "#case-desc") == case_before
    page.click("text=X-ray geometry (when the file has none)")
    for key, value in (("spacing", "1.5"), ("sdd", "1200"), ("sid", "750"), ("primary", "20"), ("secondary", "5")):
        page.fill(f"#geometry-{key}", value)
    page.wait_for_timeout(500)
    page.set_input_files("#upload-xray", str(tmp_path / "fluoro.png"))
    _wait_text(page, "#case-desc", "t.includes('fluoro.png')", 60_000)
    assert _text(page, "#status-mtre") == "-"  # no ground truth
    # a box region centred on the vertebra, then one update from the uploaded X-ray
    page.click("text=or a region-of-interest box (mm, RAS)")
    page.click("text=centre on the vertebra")
    page.click("#use-box")
    _wait_text(page, "#info", "t.includes('the box')", 30_000)
    page.click("#step")
    _wait_text(page, "#status-iteration", "parseInt(t) >= 1", 60_000)
    assert _text(page, "#status-mtre") == "-"
    page.screenshot(path=str(OUT / "page_uploaded_xray.png"))


def _work_dirs() -> set[Path]:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("ppcreg-app-*"))


def test_a_second_tab_gets_a_busy_page_then_the_session_when_the_first_closes(page, server, browser):
    other = browser.new_context(viewport={"width": 1000, "height": 700})
    tab = other.new_page()
    tab.goto(server)
    tab.wait_for_selector("#busy-page", timeout=30_000)
    tab.wait_for_timeout(4000)  # a few heartbeats: it must not take the session over
    assert tab.locator("#controls").count() == 0
    assert "in use" in tab.inner_text("#busy-page")
    tab.screenshot(path=str(OUT / "second_tab_busy.png"))
    # the first tab still owns its session, with its uploads folder
    assert page.locator("#controls").count() == 1 and "sample chest CT" in _text(page, "#ct-desc")
    first = _work_dirs()
    assert first, "the session has no private uploads folder"
    # the first tab closes: its session ends (uploads deleted, scene cleared) and the waiting tab gets a new one
    page.context.close()
    tab.wait_for_selector("#controls", timeout=30_000)
    assert _text(tab, "#ct-desc") == "CT: none"
    assert not (first & _work_dirs()), "the closed session's uploads folder was not deleted"
    assert _work_dirs(), "the new session has no uploads folder"
    tab.click("#load-sample")  # the cleared scene works for the new session
    _wait_text(tab, "#ct-desc", "t.includes('sample chest CT')")
    tab.click("#simulate")
    _wait_text(tab, "#status-mtre", "t === '10.00 mm'")
    other.close()
