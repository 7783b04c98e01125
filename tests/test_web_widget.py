"""Browser test of the emotion-curve editor (``web/js/keyface_emotion_curve.js``) in headless Chromium.

A local HTTP server serves the real extension files under ``/extensions/<pack>/`` (as ComfyUI does for
``WEB_DIRECTORY = "./web"``), the stand-in ``tests/web/fake_comfy_app.js`` as ``/scripts/app.js`` and the
test page ``tests/web/index.html``. ``tests/web/drive_widget.mjs`` (playwright-core + the system
Chromium) edits the curve with real mouse events and prints the widget state after each step; the tests
below check those states, the screenshot, and that the widget reads texts and draws curves exactly as
``keyface.emotion`` does.

Needs ``/usr/bin/chromium`` (Debian package ``chromium``), ``node`` and ``tests/web/node_modules``
(``npm ci`` in ``tests/web``); skips with a message when one is missing.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import shutil
import struct
import subprocess
import threading
import urllib.parse
import warnings
from pathlib import Path

import pytest

from keyface.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = REPO_ROOT / "web"
TEST_WEB_DIR = REPO_ROOT / "tests" / "web"
PACK_FOLDER = "comfyui-keyface"  # the folder name under ComfyUI/custom_nodes; any name works
CHROMIUM = Path(os.environ.get("KEYFACE_CHROMIUM", "/usr/bin/chromium"))
DRIVER_TIMEOUT_S = 90

# Test scenario (the steps themselves are in tests/web/drive_widget.mjs).
CURVE_TEXT = "neutral at 0 s, happy at 4 s"
BROKEN_TEXT = "neutral at 0 s, happy at banana"
LATE_TEXT = "neutral at 0 s, happy at 4 s, sad at 12.5 s"
DURATION_S = 10.0
HAPPY = (0.85, 0.75)  # docs/audio.md#emotion
SAD = (-0.85, -0.35)
CALM = (0.65, -0.5)
PRESET_TIME_S = 7.0
ACCENTUATE = 1.25
DRAG_VALUE_TOLERANCE = 0.002  # drags move by the pointer displacement: only the 3-decimal rounding remains
VALUE_TOLERANCE = 0.01  # a click lands within a fraction of a pixel (about 0.005 in value) of its target
TIME_TOLERANCE_S = 0.05

_CANONICAL = '{"format": "keyface-emotion-v1", "interpolation": "smooth", "accentuate": 1.5, "valence": [[0, 0], [2, 0.5]], "arousal": [[1, -0.2]]}'
# Texts both readers must agree on (accept or refuse, and the same points when accepted).
PARSE_CASES = [
    "happy",
    "  Calm \n",
    "neutral at 0 s, happy at 4 s, sad at 12.5 s",
    "neutral at 0s; happy at 4 sec\nsad at 6.5 seconds",
    "neutral @ 0, happy @ .5",
    "happy at 2",
    _CANONICAL,
    '{"format": "keyface-emotion-v1", "keys": [{"time": 0, "emotion": "neutral"}, {"time": 4, "emotion": "Happy"}]}',
    '{"format": "keyface-emotion-v1", "valence": [[0, 1.5]], "arousal": [[0, -3]]}',  # clipped, not refused
    "",
    "happy at banana",
    "happy, sad",
    "joyful",
    "happy at 4 s, sad at 2 s",
    '{"valence": [[0, 0]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "valence": [[0, 0]], "arousal": [[0, 0]], "speed": 2}',
    '{"format": "keyface-emotion-v1", "valence": [[0, 0], [0, 1]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "valence": [[-1, 0]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "interpolation": "cubic", "valence": [[0, 0]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "accentuate": -1, "valence": [[0, 0]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "accentuate": true, "valence": [[0, 0]], "arousal": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "keys": [{"time": 0, "emotion": "happy", "x": 1}]}',
    '{"format": "keyface-emotion-v1", "keys": [{"time": 0, "emotion": "happy"}], "valence": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "valence": [[0, 0]]}',
    '{"format": "keyface-emotion-v1", "valence": [[0, 0]], "arousal": [[0, 0]]',
    "[1, 2]",
]


def _missing_tools() -> list[str]:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if shutil.which("node") is None:
        missing.append("node (apt-get install -y nodejs)")
    if not (TEST_WEB_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append(f"{TEST_WEB_DIR}/node_modules/playwright-core (cd tests/web && npm ci)")
    return missing


class _PageHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the page, the stand-in app and the real extension folder; nothing else."""

    routes: dict[str, Path] = {}

    def translate_path(self, path: str) -> str:
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        for prefix, target in self.routes.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                relative = path[len(prefix) :] if prefix.endswith("/") else ""
                resolved = (target / relative).resolve() if relative else target
                if resolved == target or target in resolved.parents:
                    return str(resolved)
        return str(Path(self.directory) / "__not_found__")

    def log_message(self, format, *args):  # keep pytest output clean
        pass


def _serve(folder: Path):
    """Start the page server on an ephemeral 127.0.0.1 port -> (server, base url)."""
    listing = folder / "extensions.json"
    # Like ComfyUI's /extensions listing: every .js file under the pack's WEB_DIRECTORY.
    extension_urls = [
        f"/extensions/{PACK_FOLDER}/{p.relative_to(WEB_DIR).as_posix()}" for p in sorted(WEB_DIR.rglob("*.js"))
    ]
    listing.write_text(json.dumps(extension_urls))
    _PageHandler.routes = {
        "/index.html": TEST_WEB_DIR / "index.html",
        "/scripts/app.js": TEST_WEB_DIR / "fake_comfy_app.js",
        "/extensions.json": listing,
        f"/extensions/{PACK_FOLDER}/": WEB_DIR.resolve(),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_PageHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the browser driver once -> {"steps": ..., "pageErrors": ..., "screenshot": Path}."""
    missing = _missing_tools()
    if missing:
        pytest.skip("browser test needs: " + "; ".join(missing))
    folder = tmp_path_factory.mktemp("widget")
    cases = folder / "parse_cases.json"
    cases.write_text(json.dumps(PARSE_CASES))
    screenshot = folder / "widget.png"
    query = urllib.parse.urlencode({"curve": CURVE_TEXT, "broken": BROKEN_TEXT, "duration": DURATION_S})
    server, base_url = _serve(folder)
    try:
        proc = subprocess.run(
            [
                "node",
                str(TEST_WEB_DIR / "drive_widget.mjs"),
                f"{base_url}/index.html?{query}",
                str(screenshot),
                str(folder / "chromium-profile"),
                str(cases),
            ],
            cwd=TEST_WEB_DIR,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, f"driver failed:\n{proc.stderr[-4000:]}"
    (folder / "driver_output.json").write_text(proc.stdout)  # kept next to the screenshots for inspection
    result = json.loads(proc.stdout)
    result["screenshot"] = screenshot
    return result


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _points(curve: dict, channel: str) -> list[tuple[float, float]]:
    return [(t, v) for t, v in curve[channel]]


def _canonical(text: str) -> dict:
    """Parse the widget's text and check it is the canonical form, rounded to 3 decimals."""
    data = json.loads(text)
    assert list(data) == ["format", "interpolation", "accentuate", "valence", "arousal"]
    assert data["format"] == "keyface-emotion-v1"
    assert data["interpolation"] in ("linear", "smooth")
    for channel in ("valence", "arousal"):
        points = data[channel]
        assert points, channel
        times = [t for t, _ in points]
        assert times == sorted(set(times)), f"{channel} times not strictly increasing: {times}"
        for t, v in points:
            assert 0.0 <= t <= DURATION_S and -1.0 <= v <= 1.0
            assert round(t, 3) == t and round(v, 3) == v, f"{channel} point {(t, v)} not rounded to 3 decimals"
    return data


def test_page_loads_without_errors(run):
    assert run["pageErrors"] == []


def test_load_reads_timed_list_without_rewriting_it(run):
    initial = run["steps"]["initial"]
    assert initial["error"] is None
    assert initial["text"] == CURVE_TEXT
    assert _points(initial["curve"], "valence") == [(0, 0), (4, HAPPY[0])]
    assert _points(initial["curve"], "arousal") == [(0, 0), (4, HAPPY[1])]
    # The editor widget adds nothing to the saved widget values.
    assert initial["widgetNames"] == ["emotion", "duration", "emotion_curve_editor"]
    assert initial["serialized"]["widgets_values"] == [CURVE_TEXT, DURATION_S]


def test_canvas_follows_device_pixel_ratio_and_node_resize(run):
    initial, resized = run["steps"]["initial"], run["steps"]["afterResize"]
    for step in (initial, resized):
        canvas = step["canvas"]
        assert step["devicePixelRatio"] == 2
        assert (canvas["width"], canvas["height"]) == (2 * canvas["clientWidth"], 2 * canvas["clientHeight"])
    assert resized["canvas"]["clientHeight"] > initial["canvas"]["clientHeight"] + 100
    assert resized["canvas"]["clientWidth"] > initial["canvas"]["clientWidth"]
    assert resized["text"] == CURVE_TEXT  # resizing is not an edit


def test_vertical_drag_changes_value_only(run):
    step = run["steps"]["afterVerticalDrag"]
    data = _canonical(step["text"])
    expected = HAPPY[0] + step["dragPx"] / step["plot"]["height"] * 2  # the plot spans [-1, 1]
    assert expected < 1.0, "the drag must not reach the +1 limit for this check to mean anything"
    assert data["valence"] == [[0, 0], [4, pytest.approx(expected, abs=DRAG_VALUE_TOLERANCE)]]
    assert data["arousal"] == [[0, 0], [4, HAPPY[1]]]
    assert step["serialized"]["widgets_values"][0] == step["text"]


def test_horizontal_drag_changes_time_only(run):
    step = run["steps"]["afterHorizontalDrag"]
    data = _canonical(step["text"])
    expected_t = 4 + step["dragPx"] / step["plot"]["width"] * DURATION_S
    assert expected_t > 4.5
    assert data["arousal"][1] == [pytest.approx(expected_t, abs=TIME_TOLERANCE_S), HAPPY[1]]
    assert data["valence"][1][0] == 4


def test_preset_toggle_accentuate_add_and_delete(run):
    steps = run["steps"]
    # Preset at the playhead (set by clicking the time axis) keys both channels at that time.
    data = _canonical(steps["afterPreset"]["text"])
    for channel, value in (("valence", SAD[0]), ("arousal", SAD[1])):
        assert len(data[channel]) == 3
        assert data[channel][-1] == [pytest.approx(PRESET_TIME_S, abs=TIME_TOLERANCE_S), value]
    assert _canonical(steps["afterSmooth"]["text"])["interpolation"] == "smooth"
    accentuated = _canonical(steps["afterAccentuate"]["text"])
    assert accentuated["accentuate"] == ACCENTUATE

    # Double-click added one point to the channel drawn nearest the click; right-click removed it.
    step = steps["afterDoubleClick"]
    data = _canonical(step["text"])
    assert len(data["valence"]) + len(data["arousal"]) == 7
    added = [p for ch in ("valence", "arousal") for p in data[ch] if abs(p[0] - step["at"]["t"]) < TIME_TOLERANCE_S]
    assert len(added) == 1 and added[0][1] == pytest.approx(step["at"]["v"], abs=VALUE_TOLERANCE)
    assert _canonical(steps["afterRightClick"]["text"]) == accentuated

    data = _canonical(steps["afterConstant"]["text"])
    assert data["valence"] == [[0, CALM[0]]] and data["arousal"] == [[0, CALM[1]]]
    assert data["interpolation"] == "smooth" and data["accentuate"] == ACCENTUATE


def test_typing_rereads_the_text(run):
    step = run["steps"]["afterTyping"]
    assert step["text"] == "happy" and step["error"] is None
    assert _points(step["curve"], "valence") == [(0, HAPPY[0])]
    assert _points(step["curve"], "arousal") == [(0, HAPPY[1])]


def test_points_after_the_clip_are_reported_then_clipped_by_an_edit(run):
    steps = run["steps"]
    assert steps["lateKey"]["text"] == LATE_TEXT and steps["lateKey"]["error"] is None
    assert "after the clip's end" in steps["lateKey"]["status"]
    longer = steps["lateKeyLongerClip"]  # the duration widget was set to 20 s
    assert longer["duration"] == 20 and "after the clip's end" not in longer["status"]
    data = _canonical(steps["lateKeyAfterEdit"]["text"])  # back to 10 s, then "smooth" ticked
    assert data["interpolation"] == "smooth"
    assert data["valence"] == [[0, 0], [4, HAPPY[0]], [DURATION_S, SAD[0]]]
    assert data["arousal"] == [[0, 0], [4, HAPPY[1]], [DURATION_S, SAD[1]]]


def test_unreadable_text_is_shown_and_never_overwritten(run):
    for key in ("brokenInitial", "brokenAfterInteraction"):
        step = run["steps"][key]
        assert step["text"] == BROKEN_TEXT
        assert step["curve"] is None
        assert "banana" in step["error"]
        assert "Cannot read the emotion text" in step["status"] and "banana" in step["status"]
        assert all(step["controlsDisabled"])
    assert _png_size(Path(run["steps"]["errorScreenshot"]["path"]))[0] > 0


def test_screenshot_is_a_png_of_the_node(run):
    shot = run["steps"]["screenshot"]
    assert Path(shot["path"]) == run["screenshot"]
    assert _png_size(run["screenshot"]) == (
        math.ceil(shot["cssWidth"] * shot["devicePixelRatio"] - 1e-6),
        math.ceil(shot["cssHeight"] * shot["devicePixelRatio"] - 1e-6),
    )


def test_smooth_is_smoothstep_between_points(run):
    for t, smooth, linear in run["steps"]["smoothSamples"]:
        u = min(1.0, max(0.0, (t - 1) / 2))  # points (1 s, -0.5) and (3 s, 0.5); held outside
        assert smooth == pytest.approx(-0.5 + u * u * (3 - 2 * u), abs=1e-12)
        assert linear == pytest.approx(-0.5 + u, abs=1e-12)


def test_drawn_curve_matches_keyface_emotion(run):
    emotion = pytest.importorskip("keyface.emotion")
    drawn = run["steps"]["drawnCurve"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emotion.EmotionClippedWarning)  # accentuate pushes values past 1
        valence, arousal = emotion.parse_emotion(drawn["text"]).values_at(drawn["times"])
    assert max(drawn["valence"]) == 1.0  # the accentuated curve is clipped somewhere: that part is compared too
    assert drawn["valence"] == pytest.approx(valence.tolist(), abs=1e-9)
    assert drawn["arousal"] == pytest.approx(arousal.tolist(), abs=1e-9)


def test_text_reading_matches_keyface_emotion(run):
    emotion = pytest.importorskip("keyface.emotion")
    for case in run["steps"]["parseCases"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", emotion.EmotionClippedWarning)
            try:
                curve = emotion.parse_emotion(case["source"])
            except InputError as error:
                assert not case["ok"], f"{case['source']!r}: Python refuses ({error}), the widget accepts"
                continue
        assert case["ok"], f"{case['source']!r}: Python accepts, the widget refuses ({case['error']})"
        js = case["curve"]
        assert (js["interpolation"], js["accentuate"]) == (curve.interpolation, curve.accentuate), case["source"]
        for channel in ("valence", "arousal"):
            flat = [x for point in getattr(curve, channel) for x in point]
            assert [x for point in js[channel] for x in point] == pytest.approx(flat), (case["source"], channel)
