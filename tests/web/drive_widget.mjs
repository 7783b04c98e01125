// Drives the KeyFace emotion-curve widget in headless Chromium (playwright-core, system browser).
//
//   node drive_widget.mjs <page url> <screenshot.png> <fresh user-data dir> [parse_cases.json]
//
// Opens the test page (tests/web/index.html, served by tests/test_web_widget.py), edits the curve with
// real mouse/keyboard events, and prints one JSON object with the widget state after every step on
// stdout; tests/test_web_widget.py makes the assertions.
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, screenshotPath, userDataDir, parseCasesPath] = process.argv.slice(2);
if (!url || !screenshotPath || !userDataDir) {
  console.error("usage: node drive_widget.mjs <page url> <screenshot.png> <user-data dir>");
  process.exit(2);
}

const CHROMIUM = process.env.KEYFACE_CHROMIUM ?? "/usr/bin/chromium";
// Closed network: keep Chromium from phoning home (refused connections otherwise pile up).
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const DEVICE_PIXEL_RATIO = 2;
const VERTICAL_DRAG_PX = 20;
const RESIZED_NODE = [480, 640]; // [width, height] in CSS pixels, like a user dragging the node corner
const HORIZONTAL_DRAG_PX = 50;
const PRESET_TIME_S = 7;
const DOUBLE_CLICK_AT = { t: 9, v: -0.6 };
const ACCENTUATE = 1.25;
const LATE_TEXT = "neutral at 0 s, happy at 4 s, sad at 12.5 s"; // last key after the 10 s clip

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  args: CHROMIUM_ARGS,
  viewport: { width: 1040, height: 700 },
  deviceScaleFactor: DEVICE_PIXEL_RATIO,
});
const result = { pageErrors: [], steps: {} };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (err) => result.pageErrors.push(String(err)));
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") result.pageErrors.push(`console.${msg.type()}: ${msg.text()}`);
  });
  await page.goto(url);
  await page.waitForFunction(() => window.__kf?.ready, null, { timeout: 15000 });
  const setupError = await page.evaluate(() => window.__kf.error ?? null);
  if (setupError) throw new Error(`test page failed: ${setupError}`);
  await page.waitForSelector("#node-curve canvas.keyface-ec-canvas", { state: "visible" });

  const editorOf = (key) => `window.__kf.nodes[${JSON.stringify(key)}].widgets.find((w) => w.editor).editor`;
  const state = (key) =>
    page.evaluate((key) => {
      const node = window.__kf.nodes[key];
      const editor = node.widgets.find((w) => w.editor)?.editor;
      const canvas = node.el.querySelector("canvas");
      return {
        text: node.widgets.find((w) => w.name === "emotion").value,
        serialized: node.serialize(),
        curve: editor?.curve ?? null,
        error: editor?.error ?? null,
        status: node.el.querySelector(".keyface-ec-status")?.textContent ?? null,
        controlsDisabled: [...node.el.querySelectorAll(".keyface-ec-toolbar button, .keyface-ec-toolbar select, .keyface-ec-toolbar input")].map((c) => c.disabled),
        duration: editor?.duration ?? null,
        plot: editor?.plotRect() ?? null,
        canvas: canvas && { clientWidth: canvas.clientWidth, clientHeight: canvas.clientHeight, width: canvas.width, height: canvas.height },
        devicePixelRatio: window.devicePixelRatio,
        widgetNames: node.widgets.map((w) => w.name),
      };
    }, key);
  const pointPos = (key, channel, index) =>
    page.evaluate(([e, channel, index]) => eval(e).clientPositionOf(channel, index), [editorOf(key), channel, index]);
  const positionAt = (key, t, v) => page.evaluate(([e, t, v]) => eval(e).clientPositionAt(t, v), [editorOf(key), t, v]);
  const drag = async (from, to) => {
    await page.mouse.move(from.x, from.y);
    await page.mouse.down();
    await page.mouse.move(to.x, to.y, { steps: 6 });
    await page.mouse.up();
  };
  const steps = result.steps;

  steps.initial = await state("curve");

  // Resize the node: the editor follows (ResizeObserver) and keeps device-pixel resolution.
  await page.evaluate((size) => window.__kf.nodes.curve.setSize(size), RESIZED_NODE);
  await page.waitForFunction(
    (h) => {
      const canvas = window.__kf.nodes.curve.el.querySelector("canvas");
      return canvas.clientHeight > h && canvas.height === canvas.clientHeight * window.devicePixelRatio;
    },
    steps.initial.canvas.clientHeight,
    { timeout: 5000 },
  );
  steps.afterResize = { ...(await state("curve")), nodeSize: RESIZED_NODE };

  // Vertical drag of the valence point at t = 4 s (index 1) upwards.
  let p = await pointPos("curve", "valence", 1);
  await drag(p, { x: p.x, y: p.y - VERTICAL_DRAG_PX });
  steps.afterVerticalDrag = { ...(await state("curve")), dragPx: VERTICAL_DRAG_PX };

  // Horizontal drag of the arousal point at t = 4 s to the right.
  p = await pointPos("curve", "arousal", 1);
  await drag(p, { x: p.x + HORIZONTAL_DRAG_PX, y: p.y });
  steps.afterHorizontalDrag = { ...(await state("curve")), dragPx: HORIZONTAL_DRAG_PX };

  // Preset "sad": click the time axis (below the plot) to move the playhead, then "Add at playhead".
  await page.selectOption("#node-curve .keyface-ec-toolbar select", "sad");
  const axis = await positionAt("curve", PRESET_TIME_S, -1);
  await page.mouse.click(axis.x, axis.y + 8);
  await page.click("#node-curve button:text('Add at playhead')");
  steps.afterPreset = await state("curve");

  // Interpolation toggle.
  await page.check("#node-curve .keyface-ec-toolbar input[type=checkbox]");
  steps.afterSmooth = await state("curve");

  // Accentuate (the dashed curve previews the accentuated, clipped values).
  await page.fill("#node-curve .keyface-ec-toolbar input[type=number]", String(ACCENTUATE));
  await page.press("#node-curve .keyface-ec-toolbar input[type=number]", "Enter");
  steps.afterAccentuate = await state("curve");

  // Double-click on empty plot area adds a point to the channel drawn closest to the click.
  const dbl = await positionAt("curve", DOUBLE_CLICK_AT.t, DOUBLE_CLICK_AT.v);
  await page.mouse.dblclick(dbl.x, dbl.y);
  steps.afterDoubleClick = { ...(await state("curve")), at: DOUBLE_CLICK_AT };

  const box = await page.locator("#node-curve").boundingBox();
  await page.locator("#node-curve").screenshot({ path: screenshotPath });
  steps.screenshot = { path: screenshotPath, cssWidth: box.width, cssHeight: box.height, devicePixelRatio: DEVICE_PIXEL_RATIO };

  // Right-click on the added point deletes it.
  const added = await positionAt("curve", DOUBLE_CLICK_AT.t, DOUBLE_CLICK_AT.v);
  await page.mouse.click(added.x, added.y, { button: "right" });
  steps.afterRightClick = await state("curve");

  // The module's own functions: the smoothstep used for drawing, the curve the plot shows (for the
  // accentuated smooth curve above, sampled every 0.1 s) and how it reads texts (compared with Python).
  const parseCases = parseCasesPath ? JSON.parse(readFileSync(parseCasesPath, "utf8")) : [];
  Object.assign(steps, await page.evaluate(async ({ text, cases }) => {
    const mod = await import(window.__kf.extensionUrls.find((u) => u.endsWith("keyface_emotion_curve.js")));
    const points = [[1, -0.5], [3, 0.5]];
    const curve = mod.parseEmotionText(text);
    const times = Array.from({ length: 101 }, (_, i) => i / 10);
    const drawn = (ch) => times.map((t) => mod.effectiveValueAt(curve[ch], t, curve.interpolation, curve.accentuate));
    const parse = (source) => {
      try {
        return { ok: true, curve: mod.parseEmotionText(source) };
      } catch (err) {
        return { ok: false, error: err.message };
      }
    };
    return {
      smoothSamples: [0, 1, 1.5, 2, 2.5, 3, 4].map((t) => [t, mod.valueAt(points, t, "smooth"), mod.valueAt(points, t, "linear")]),
      drawnCurve: { text, times, valence: drawn("valence"), arousal: drawn("arousal") },
      parseCases: cases.map((source) => ({ source, ...parse(source) })),
    };
  }, { text: steps.afterAccentuate.text, cases: parseCases }));

  // "Set constant" with the preset "calm".
  await page.selectOption("#node-curve .keyface-ec-toolbar select", "calm");
  await page.click("#node-curve button:text('Set constant')");
  steps.afterConstant = await state("curve");

  // Typing into the text widget re-reads it (and does not rewrite it).
  await page.fill("#node-curve textarea", "happy");
  steps.afterTyping = await state("curve");

  // A key after the clip's end is reported, follows the duration widget, and is clipped by the next edit.
  const setDuration = async (seconds) => {
    await page.fill("#node-curve .fake-number input", String(seconds));
    await page.dispatchEvent("#node-curve .fake-number input", "change");
  };
  await page.fill("#node-curve textarea", LATE_TEXT);
  steps.lateKey = await state("curve");
  await setDuration(20);
  steps.lateKeyLongerClip = await state("curve");
  await setDuration(10);
  await page.check("#node-curve .keyface-ec-toolbar input[type=checkbox]"); // timed lists read as linear
  steps.lateKeyAfterEdit = await state("curve");

  // The node whose text cannot be read: error shown, text untouched even after a drag attempt.
  steps.brokenInitial = await state("broken");
  const center = await positionAt("broken", 5, 0);
  await drag(center, { x: center.x + 30, y: center.y - 30 });
  await page.mouse.dblclick(center.x, center.y);
  steps.brokenAfterInteraction = await state("broken");
  const errorShot = screenshotPath.replace(/\.png$/, "") + "_error.png";
  await page.locator("#node-broken").screenshot({ path: errorShot });
  steps.errorScreenshot = { path: errorShot };
} finally {
  await context.close();
}
process.stdout.write(JSON.stringify(result));
