// KeyFace emotion-curve editor: a ComfyUI frontend extension for the "KeyFace Emotion Curve" node.
//
// It adds a canvas below the node's `emotion` text widget that shows valence and arousal over the
// clip's time (0 .. `duration` seconds) and lets the user edit them: drag control points, add and
// delete points, apply preset emotions, switch interpolation and set the accentuate factor.
//
// The `emotion` STRING widget stays the single source of truth: the editor parses it (an emotion
// name, a timed list such as "neutral at 0 s, happy at 4 s", or the canonical JSON) and every edit
// writes the canonical JSON back into it, so the value is saved in the workflow file and the node
// works without this extension. Text that cannot be read is shown as an error and never overwritten.
//
// Canonical JSON (shared with keyface.emotion, see the project's helper brief):
//   {"format": "keyface-emotion-v1", "interpolation": "linear" | "smooth", "accentuate": 1.0,
//    "valence": [[t, v], ...], "arousal": [[t, a], ...]}
// Times in seconds, strictly increasing; values in [-1, 1]; the value holds before the first and after
// the last point.
//
// Plain ES module, no external libraries, no network access.

// ComfyUI serves this file as /extensions/<pack folder>/js/keyface_emotion_curve.js (WEB_DIRECTORY is
// "./web"), so three levels up is the site root, where the frontend keeps its `scripts/app.js` shim.
import { app } from "../../../scripts/app.js";

const NODE_CLASS = "KeyFaceEmotionCurve";
const TEXT_WIDGET = "emotion";
const DURATION_WIDGET = "duration";
const EDITOR_WIDGET = "emotion_curve_editor";

export const CURVE_FORMAT = "keyface-emotion-v1";
export const INTERPOLATIONS = ["linear", "smooth"];
const DEFAULT_DURATION_S = 10; // the node's `duration` default
const DECIMALS = 3; // canonical JSON keeps 3 decimals (1 ms, 0.001 value units)
const MIN_POINT_GAP_S = 10 ** -DECIMALS; // keeps times strictly increasing after rounding
const JSON_KEYS = ["format", "interpolation", "accentuate", "valence", "arousal", "keys"];

// Named emotions -> [valence, arousal], from docs/audio.md#emotion (the fixed table the
// original implementation maps emotion names to).
export const EMOTIONS = Object.freeze({
  happy: [0.85, 0.75],
  angry: [-0.443, 0.908],
  surprised: [0.0, 0.85],
  sad: [-0.85, -0.35],
  neutral: [0.0, 0.0],
  fear: [0.181, 0.949],
  disgusted: [-0.8, 0.5],
  contempt: [0.307, 0.535],
  calm: [0.65, -0.5],
  excited: [0.9, 0.9],
  bored: [-0.6, -0.9],
  confused: [-0.3, 0.4],
  anxious: [-0.85, 0.9],
  confident: [0.7, 0.4],
  frustrated: [-0.8, 0.6],
  amused: [0.7, 0.5],
  proud: [0.8, 0.4],
  ashamed: [-0.8, -0.3],
  grateful: [0.7, 0.2],
  jealous: [-0.7, 0.5],
  hopeful: [0.7, 0.3],
  disappointed: [-0.7, -0.3],
  curious: [0.5, 0.5],
  overwhelmed: [-0.6, 0.8],
});

export const CHANNELS = ["valence", "arousal"];
const CHANNEL_STYLE = {
  valence: { color: "#ffa94d", label: "valence" },
  arousal: { color: "#4dabf7", label: "arousal" },
};

// ---------------------------------------------------------------------------------------------
// Curve model: {interpolation, accentuate, valence: [[t, v], ...], arousal: [[t, a], ...]}
// ---------------------------------------------------------------------------------------------

const round = (x) => {
  const r = Math.round(x * 10 ** DECIMALS) / 10 ** DECIMALS;
  return Object.is(r, -0) ? 0 : r;
};
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

/** Position of `t` within a segment [t0, t1] mapped to a blend weight in [0, 1].
 *
 * "linear": the weight is u itself (straight segments).
 * "smooth": smoothstep, w = 3u^2 - 2u^3 (zero slope at every control point, never overshoots the
 * two neighbouring values). keyface/emotion.py evaluates the curve with the same formula, so the
 * drawn curve is what the model receives.
 */
function blendWeight(u, interpolation) {
  return interpolation === "smooth" ? u * u * (3 - 2 * u) : u;
}

/** Value of one channel (a sorted list of [t, v] points) at time `t` seconds. */
export function valueAt(points, t, interpolation) {
  if (t <= points[0][0]) return points[0][1];
  const last = points[points.length - 1];
  if (t >= last[0]) return last[1];
  let i = 1;
  while (points[i][0] < t) i += 1;
  const [t0, v0] = points[i - 1];
  const [t1, v1] = points[i];
  return v0 + (v1 - v0) * blendWeight((t - t0) / (t1 - t0), interpolation);
}

/** Value the model receives: the interpolated value times `accentuate`, clipped to [-1, 1]. */
export function effectiveValueAt(points, t, interpolation, accentuate) {
  return clamp(valueAt(points, t, interpolation) * accentuate, -1, 1);
}

function emotionValues(name, where = "") {
  const key = String(name).trim().toLowerCase();
  if (!Object.hasOwn(EMOTIONS, key)) {
    const prefix = where ? `${where}: ` : "";
    throw new Error(`${prefix}unknown emotion "${String(name).trim()}"; known: ${Object.keys(EMOTIONS).join(", ")}`);
  }
  return EMOTIONS[key];
}

/** Both channels from named emotions at times: [{time, emotion}, ...]. */
function curveFromKeys(keys, interpolation, accentuate) {
  checkIncreasing(keys.map((k) => k.time), "emotion times");
  return {
    interpolation,
    accentuate,
    valence: keys.map((k) => [k.time, emotionValues(k.emotion, `at ${k.time} s`)[0]]),
    arousal: keys.map((k) => [k.time, emotionValues(k.emotion, `at ${k.time} s`)[1]]),
  };
}

function checkIncreasing(times, what) {
  for (let i = 1; i < times.length; i += 1) {
    if (!(times[i] > times[i - 1])) {
      throw new Error(`${what} must be strictly increasing (${times[i - 1]} s is followed by ${times[i]} s)`);
    }
  }
}

function finiteNumber(x, what) {
  if (typeof x !== "number" || !Number.isFinite(x)) throw new Error(`${what} must be a number, got ${JSON.stringify(x)}`);
  return x;
}

function parseChannel(raw, name) {
  if (!Array.isArray(raw) || raw.length === 0) {
    throw new Error(`"${name}" must be a non-empty list of [time_seconds, value] pairs`);
  }
  const points = raw.map((p, i) => {
    if (!Array.isArray(p) || p.length !== 2) throw new Error(`"${name}" point ${i} must be [time_seconds, value]`);
    const t = finiteNumber(p[0], `"${name}" point ${i} time`);
    const v = finiteNumber(p[1], `"${name}" point ${i} value`);
    if (t < 0) throw new Error(`"${name}" point ${i}: time ${t} s is negative`);
    return [t, clamp(v, -1, 1)]; // keyface.emotion clips too (with a warning at run time)
  });
  checkIncreasing(points.map((p) => p[0]), `"${name}" times`);
  return points;
}

function parseJsonCurve(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new Error(`invalid JSON (${err.message})`);
  }
  if (data === null || typeof data !== "object" || Array.isArray(data)) throw new Error("the JSON must be an object");
  if (data.format !== CURVE_FORMAT) {
    throw new Error(`"format" must be "${CURVE_FORMAT}", got ${JSON.stringify(data.format ?? null)}`);
  }
  const unknown = Object.keys(data).filter((key) => !JSON_KEYS.includes(key));
  if (unknown.length) throw new Error(`unknown entries ${unknown.join(", ")}; allowed: ${JSON_KEYS.join(", ")}`);
  const interpolation = "interpolation" in data ? data.interpolation : "linear";
  if (!INTERPOLATIONS.includes(interpolation)) {
    throw new Error(`"interpolation" must be "linear" or "smooth", got ${JSON.stringify(interpolation)}`);
  }
  const accentuate = finiteNumber("accentuate" in data ? data.accentuate : 1, '"accentuate"');
  if (accentuate < 0) throw new Error(`"accentuate" must be >= 0, got ${accentuate}`);

  const hasChannels = data.valence !== undefined || data.arousal !== undefined;
  if (data.keys !== undefined) {
    if (hasChannels) throw new Error('give either "keys" or "valence"/"arousal", not both');
    if (!Array.isArray(data.keys) || data.keys.length === 0) {
      throw new Error('"keys" must be a non-empty list of {"time": seconds, "emotion": name}');
    }
    const keys = data.keys.map((k, i) => {
      const shape = k !== null && typeof k === "object" ? Object.keys(k).sort().join() : "";
      if (shape !== "emotion,time") throw new Error(`"keys" item ${i} must be {"time": seconds, "emotion": name}`);
      const time = finiteNumber(k.time, `"keys" item ${i} time`);
      if (time < 0) throw new Error(`"keys" item ${i}: time ${time} s is negative`);
      if (typeof k.emotion !== "string") throw new Error(`"keys" item ${i}: "emotion" must be a name`);
      return { time, emotion: k.emotion };
    });
    return curveFromKeys(keys, interpolation, accentuate);
  }
  if (data.valence === undefined || data.arousal === undefined) {
    throw new Error('the JSON needs both "valence" and "arousal" point lists (or "keys")');
  }
  return {
    interpolation,
    accentuate,
    valence: parseChannel(data.valence, "valence"),
    arousal: parseChannel(data.arousal, "arousal"),
  };
}

// Timed lists, read exactly as keyface.emotion reads them: the text is a timed list when it contains
// " at <number>" or "@"; entries are separated by "," ";" or newlines; each entry (lower-cased) is
// "<emotion> at|@ <seconds> [s|sec|secs|second|seconds]".
const TIMED_LIST = /\s(at|@)\s*[0-9.]|@/;
const TIMED_ENTRY = /^\s*([a-z][a-z_ ]*?)\s+(?:at|@)\s*([0-9]*\.?[0-9]+)\s*(?:s|sec|secs|seconds?)?\s*$/;

function parseTimedList(text) {
  const entries = text.split(/[,;\n]/).filter((entry) => entry.trim());
  const keys = entries.map((entry) => {
    const match = TIMED_ENTRY.exec(entry.toLowerCase());
    if (!match) throw new Error(`cannot read "${entry.trim()}"; write entries like "happy at 4 s", separated by commas`);
    return { time: Number(match[2]), emotion: match[1].trim() };
  });
  return curveFromKeys(keys, "linear", 1);
}

/** Parse the node's text (emotion name, timed list or canonical JSON) into a curve; throws Error. */
export function parseEmotionText(text) {
  const source = String(text ?? "").trim();
  if (!source) throw new Error('the emotion text is empty; write an emotion name such as "neutral"');
  if (source.startsWith("{")) return parseJsonCurve(source);
  if (TIMED_LIST.test(source)) return parseTimedList(source);
  const [valence, arousal] = emotionValues(source);
  return { interpolation: "linear", accentuate: 1, valence: [[0, valence]], arousal: [[0, arousal]] };
}

function normalizeChannel(points, duration) {
  const byTime = new Map();
  for (const [t, v] of points) {
    const time = round(clamp(t, 0, duration));
    // When clipping/rounding makes two times equal, the earlier point is kept: points beyond the
    // clip's end then merge into the one at its end instead of replacing it.
    if (!byTime.has(time)) byTime.set(time, round(clamp(v, -1, 1)));
  }
  return [...byTime.entries()].sort((a, b) => a[0] - b[0]);
}

/** The canonical form of a curve for a clip of `duration` seconds: sorted, clipped, rounded. */
export function normalizeCurve(curve, duration) {
  return {
    interpolation: curve.interpolation === "smooth" ? "smooth" : "linear",
    accentuate: round(Math.max(0, curve.accentuate)),
    valence: normalizeChannel(curve.valence, duration),
    arousal: normalizeChannel(curve.arousal, duration),
  };
}

/** Canonical JSON text of a curve (valid JSON; one channel per line so the text widget stays readable). */
export function serializeCurve(curve, duration) {
  const c = normalizeCurve(curve, duration);
  const points = (ps) => `[${ps.map(([t, v]) => `[${t}, ${v}]`).join(", ")}]`;
  return (
    `{"format": "${CURVE_FORMAT}", "interpolation": "${c.interpolation}", "accentuate": ${c.accentuate},\n` +
    ` "valence": ${points(c.valence)},\n` +
    ` "arousal": ${points(c.arousal)}}`
  );
}

// ---------------------------------------------------------------------------------------------
// Editor widget
// ---------------------------------------------------------------------------------------------

const STYLE_ID = "keyface-emotion-curve-style";
const STYLE = `
.keyface-ec { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; width: 100%; height: 100%;
  font: 12px sans-serif; color: var(--input-text, #ddd); }
.keyface-ec-toolbar { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; }
.keyface-ec-toolbar select, .keyface-ec-toolbar button, .keyface-ec-toolbar input {
  font: inherit; color: inherit; background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e);
  border-radius: 4px; padding: 1px 5px; height: 22px; box-sizing: border-box; }
.keyface-ec-toolbar button { cursor: pointer; }
.keyface-ec-toolbar button:disabled, .keyface-ec-toolbar select:disabled, .keyface-ec-toolbar input:disabled { opacity: 0.45; cursor: default; }
.keyface-ec-toolbar label { display: inline-flex; align-items: center; gap: 3px; white-space: nowrap; }
.keyface-ec-toolbar input[type="checkbox"] { height: auto; }
.keyface-ec-toolbar input[type="number"] { width: 58px; }
.keyface-ec-canvas { flex: 1 1 auto; min-height: 60px; width: 100%; display: block; border-radius: 4px;
  touch-action: none; outline: none; }
.keyface-ec-canvas:focus-visible { box-shadow: 0 0 0 1px var(--border-color, #888); }
.keyface-ec-status { min-height: 15px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  color: var(--descrip-text, #999); }
.keyface-ec-status.keyface-ec-error { color: #ff6b6b; white-space: normal; }
`;

function ensureStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = STYLE;
  document.head.append(style);
}

function element(tag, props = {}, children = []) {
  const el = document.createElement(tag);
  Object.assign(el, props);
  el.append(...children);
  return el;
}

// Plot layout inside the canvas, in CSS pixels.
const PLOT_MARGIN = { left: 30, right: 10, top: 18, bottom: 18 };
const POINT_RADIUS = 4.5;
const HIT_RADIUS = 8;
const NICE_TIME_STEPS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600];
const MIN_TICK_SPACING_PX = 48;
const SMOOTH_SAMPLES_PER_SEGMENT = 32;
const EDITOR_MIN_HEIGHT = 230; // toolbar + a usable plot + status line
const MIN_NODE_WIDTH = 440; // the toolbar fits on two rows
const MIN_ZOOM = 0.25; // backing-store resolution follows the graph zoom within these bounds
const MAX_ZOOM = 4;

class EmotionCurveEditor {
  constructor(node, textWidget, durationWidget) {
    this.node = node;
    this.textWidget = textWidget;
    this.durationWidget = durationWidget;
    this.curve = null; // null while the text cannot be read
    this.error = null;
    this.lastWrittenText = null;
    this.selected = null; // {channel, index}
    this.drag = null;
    this.activeChannel = "valence"; // wins when points of both channels overlap
    this.playhead = 0;
    this.hint = "";
    this.backingKey = "";
    this.buildDom();
  }

  // ---- DOM -----------------------------------------------------------------------------------

  buildDom() {
    ensureStyle();
    this.preset = element(
      "select",
      { title: "Preset emotion (valence, arousal) from the KeyFace table" },
      Object.entries(EMOTIONS).map(([name, [v, a]]) => element("option", { value: name, textContent: `${name} (${v}, ${a})` })),
    );
    this.preset.value = "happy";
    this.addKeyButton = element("button", { textContent: "Add at playhead", title: "Set both channels to the preset at the playhead time (click the plot to move the playhead)" });
    this.constantButton = element("button", { textContent: "Set constant", title: "Make the whole clip the preset emotion" });
    this.smoothBox = element("input", { type: "checkbox", title: "Smooth (smoothstep) instead of straight segments between points" });
    this.accentuateInput = element("input", { type: "number", min: "0", step: "0.05", title: "Accentuate: multiplies the values (result clipped to [-1, 1])" });
    this.deleteButton = element("button", { textContent: "Delete point", title: "Delete the selected point (or right-click a point)" });
    this.canvas = element("canvas", { className: "keyface-ec-canvas", tabIndex: 0 });
    this.status = element("div", { className: "keyface-ec-status" });
    const toolbar = element("div", { className: "keyface-ec-toolbar" }, [
      this.preset,
      this.addKeyButton,
      this.constantButton,
      element("label", {}, [this.smoothBox, "smooth"]),
      element("label", { title: this.accentuateInput.title }, ["accentuate", this.accentuateInput]),
      this.deleteButton,
    ]);
    this.root = element("div", { className: "keyface-ec" }, [toolbar, this.canvas, this.status]);

    this.addKeyButton.addEventListener("click", () => this.addPresetAt(this.playhead));
    this.constantButton.addEventListener("click", () => this.setConstant());
    this.smoothBox.addEventListener("change", () => this.edit((c) => { c.interpolation = this.smoothBox.checked ? "smooth" : "linear"; }));
    this.accentuateInput.addEventListener("change", () => {
      const value = Number(this.accentuateInput.value);
      if (!Number.isFinite(value)) return this.syncControls();
      this.edit((c) => { c.accentuate = Math.max(0, value); });
    });
    this.deleteButton.addEventListener("click", () => this.deleteSelected());

    const canvas = this.canvas;
    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    canvas.addEventListener("dblclick", (e) => this.onDoubleClick(e));
    canvas.addEventListener("contextmenu", (e) => this.onContextMenu(e));
    canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
    this.resizeObserver = new ResizeObserver(() => this.draw());
    this.resizeObserver.observe(canvas);
  }

  dispose() {
    this.resizeObserver.disconnect();
  }

  // ---- value <-> text ------------------------------------------------------------------------

  get duration() {
    const d = Number(this.durationWidget?.value);
    return Number.isFinite(d) && d > 0 ? d : DEFAULT_DURATION_S;
  }

  /** Re-read the text widget (on creation, load, typing, undo). Never writes the text. */
  syncFromText() {
    const text = this.textWidget.value;
    try {
      this.curve = parseEmotionText(text);
      this.error = null;
    } catch (err) {
      this.curve = null;
      this.error = err.message;
    }
    if (this.selected && !this.curve?.[this.selected.channel]?.[this.selected.index]) this.selected = null;
    this.syncControls();
    this.draw();
  }

  onTextWidgetChanged() {
    if (this.textWidget.value !== this.lastWrittenText) this.syncFromText();
  }

  /** Apply `change` to a copy of the curve, then write its canonical JSON into the text widget. */
  edit(change) {
    if (!this.curve) return;
    const next = structuredClone(this.curve);
    change(next);
    this.curve = normalizeCurve(next, this.duration);
    if (this.selected && !this.curve[this.selected.channel][this.selected.index]) this.selected = null;
    this.lastWrittenText = serializeCurve(this.curve, this.duration);
    this.textWidget.value = this.lastWrittenText;
    this.node.setDirtyCanvas?.(true, true);
    this.syncControls();
    this.draw();
  }

  syncControls() {
    const editable = this.curve !== null;
    for (const control of [this.preset, this.addKeyButton, this.constantButton, this.smoothBox, this.accentuateInput]) {
      control.disabled = !editable;
    }
    this.deleteButton.disabled = !editable || !this.selected;
    if (editable) {
      this.smoothBox.checked = this.curve.interpolation === "smooth";
      if (document.activeElement !== this.accentuateInput) this.accentuateInput.value = String(this.curve.accentuate);
    }
    this.updateStatus();
  }

  updateStatus() {
    const s = this.status;
    s.classList.toggle("keyface-ec-error", this.error !== null);
    if (this.error !== null) {
      s.textContent = `Cannot read the emotion text: ${this.error}. Fix the text above; the curve editor is paused until then.`;
      return;
    }
    const late = CHANNELS.reduce((n, ch) => n + this.curve[ch].filter(([t]) => t > this.duration).length, 0);
    if (late) {
      s.textContent = `${late} point(s) lie after the clip's end (${this.duration} s); the next edit moves them to ${this.duration} s.`;
      return;
    }
    s.textContent = this.hint || `playhead ${this.playhead.toFixed(2)} s · drag points · double-click: add · right-click: delete`;
  }

  // ---- geometry ------------------------------------------------------------------------------

  plotRect() {
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    return {
      left: PLOT_MARGIN.left,
      top: PLOT_MARGIN.top,
      width: Math.max(1, w - PLOT_MARGIN.left - PLOT_MARGIN.right),
      height: Math.max(1, h - PLOT_MARGIN.top - PLOT_MARGIN.bottom),
    };
  }

  xOf(t) {
    const r = this.plotRect();
    return r.left + (clamp(t, 0, this.duration) / this.duration) * r.width;
  }

  yOf(v) {
    const r = this.plotRect();
    return r.top + ((1 - v) / 2) * r.height;
  }

  timeAtX(x) {
    const r = this.plotRect();
    return clamp(((x - r.left) / r.width) * this.duration, 0, this.duration);
  }

  valueAtY(y) {
    const r = this.plotRect();
    return clamp(1 - (2 * (y - r.top)) / r.height, -1, 1);
  }

  /** Pointer position in the canvas' own CSS pixels (the frontend scales DOM widgets with the canvas zoom). */
  localPoint(event) {
    const rect = this.canvas.getBoundingClientRect();
    const sx = rect.width ? this.canvas.clientWidth / rect.width : 1;
    const sy = rect.height ? this.canvas.clientHeight / rect.height : 1;
    return { x: (event.clientX - rect.left) * sx, y: (event.clientY - rect.top) * sy };
  }

  /** Client (page) coordinates of a control point: for scripted tests and other extensions. */
  clientPositionOf(channel, index) {
    const [t, v] = this.curve[channel][index];
    return this.clientPositionAt(t, v);
  }

  clientPositionAt(t, v) {
    const rect = this.canvas.getBoundingClientRect();
    const sx = this.canvas.clientWidth ? rect.width / this.canvas.clientWidth : 1;
    const sy = this.canvas.clientHeight ? rect.height / this.canvas.clientHeight : 1;
    return { x: rect.left + this.xOf(t) * sx, y: rect.top + this.yOf(v) * sy };
  }

  hitTest(x, y) {
    let best = null;
    const order = this.activeChannel === "valence" ? CHANNELS : [...CHANNELS].reverse();
    for (const channel of order) {
      this.curve[channel].forEach(([t, v], index) => {
        if (t > this.duration) return; // drawn at the end for reference; the next edit clips it
        const d = Math.hypot(this.xOf(t) - x, this.yOf(v) - y);
        if (d <= HIT_RADIUS && (!best || d < best.d - 0.5)) best = { channel, index, d };
      });
    }
    return best && { channel: best.channel, index: best.index };
  }

  legendHit(x, y) {
    return (this.legendBoxes ?? []).find((b) => x >= b.x0 && x <= b.x1 && y >= b.y0 && y <= b.y1)?.channel ?? null;
  }

  // ---- interaction ---------------------------------------------------------------------------

  onPointerDown(e) {
    e.stopPropagation();
    if (!this.curve || e.button !== 0) return;
    this.canvas.focus({ preventScroll: true });
    const { x, y } = this.localPoint(e);
    const legend = this.legendHit(x, y);
    if (legend) {
      this.activeChannel = legend;
      this.draw();
      return;
    }
    const hit = this.hitTest(x, y);
    if (hit) {
      this.selected = hit;
      this.activeChannel = hit.channel;
      const [t, v] = this.curve[hit.channel][hit.index];
      this.drag = { ...hit, pointerId: e.pointerId, x0: x, y0: y, t0: t, v0: v };
      this.canvas.setPointerCapture?.(e.pointerId);
    } else {
      this.selected = null;
      this.playhead = round(this.timeAtX(x));
    }
    e.preventDefault();
    this.syncControls();
    this.draw();
  }

  onPointerMove(e) {
    const { x, y } = this.localPoint(e);
    if (!this.drag) {
      if (this.curve) {
        const hit = this.hitTest(x, y);
        this.canvas.style.cursor = hit ? "grab" : this.legendHit(x, y) ? "pointer" : "crosshair";
        this.hint = hit ? this.describePoint(hit) : "";
        this.updateStatus();
      }
      return;
    }
    e.stopPropagation();
    const { channel, index, x0, y0, t0, v0 } = this.drag;
    const r = this.plotRect();
    const points = this.curve[channel];
    // Move by the pointer's displacement, so a purely vertical drag keeps the time exactly.
    const lo = index > 0 ? points[index - 1][0] + MIN_POINT_GAP_S : 0;
    const hi = Math.min(this.duration, index < points.length - 1 ? points[index + 1][0] - MIN_POINT_GAP_S : Infinity);
    const t = clamp(t0 + ((x - x0) / r.width) * this.duration, lo, Math.max(lo, hi));
    const v = clamp(v0 - ((y - y0) / r.height) * 2, -1, 1);
    this.canvas.style.cursor = "grabbing";
    this.edit((c) => { c[channel][index] = [t, v]; });
    this.hint = this.describePoint({ channel, index });
    this.updateStatus();
  }

  onPointerUp(e) {
    if (!this.drag || e.pointerId !== this.drag.pointerId) return;
    e.stopPropagation();
    this.canvas.releasePointerCapture?.(e.pointerId);
    this.drag = null;
    this.canvas.style.cursor = "grab";
  }

  onDoubleClick(e) {
    e.stopPropagation();
    e.preventDefault();
    if (!this.curve) return;
    const { x, y } = this.localPoint(e);
    if (this.hitTest(x, y) || this.legendHit(x, y)) return;
    const t = round(this.timeAtX(x));
    const v = this.valueAtY(y);
    // Add to the channel whose drawn curve passes closest to the click.
    const distance = (ch) => Math.abs(this.yOf(valueAt(this.curve[ch], t, this.curve.interpolation)) - y);
    const others = CHANNELS.filter((ch) => ch !== this.activeChannel);
    const channel = others.reduce((best, ch) => (distance(ch) < distance(best) ? ch : best), this.activeChannel);
    this.edit((c) => { upsertPoint(c[channel], t, v); });
    this.selected = { channel, index: this.curve[channel].findIndex(([pt]) => pt === t) };
    this.activeChannel = channel;
    this.syncControls();
    this.draw();
  }

  onContextMenu(e) {
    e.preventDefault();
    e.stopPropagation();
    if (!this.curve) return;
    const { x, y } = this.localPoint(e);
    const hit = this.hitTest(x, y);
    if (hit) this.deletePoint(hit);
  }

  onKeyDown(e) {
    if ((e.key === "Delete" || e.key === "Backspace") && this.selected) {
      e.preventDefault();
      e.stopPropagation(); // keep ComfyUI from deleting the node itself
      this.deleteSelected();
    }
  }

  describePoint({ channel, index }) {
    const [t, v] = this.curve[channel][index];
    return `${channel} ${v.toFixed(3)} at ${t.toFixed(3)} s`;
  }

  deleteSelected() {
    if (this.selected) this.deletePoint(this.selected);
  }

  deletePoint({ channel, index }) {
    if (this.curve[channel].length <= 1) {
      this.hint = `${channel} needs at least one point`;
      this.updateStatus();
      return;
    }
    this.selected = null;
    this.hint = "";
    this.edit((c) => { c[channel].splice(index, 1); });
  }

  addPresetAt(time) {
    const name = this.preset.value;
    const t = round(clamp(time, 0, this.duration));
    this.edit((c) => {
      CHANNELS.forEach((ch, i) => upsertPoint(c[ch], t, EMOTIONS[name][i]));
    });
  }

  setConstant() {
    const [v, a] = EMOTIONS[this.preset.value];
    this.selected = null;
    this.edit((c) => {
      c.valence = [[0, v]];
      c.arousal = [[0, a]];
    });
  }

  // ---- drawing -------------------------------------------------------------------------------

  /** Match the backing store to the canvas' on-screen size (devicePixelRatio and canvas zoom). */
  /** Device pixels per CSS pixel of the canvas: devicePixelRatio times the graph canvas zoom. */
  displayScale() {
    const rect = this.canvas.getBoundingClientRect();
    const cssW = this.canvas.clientWidth;
    const zoom = cssW > 0 && rect.width > 0 ? rect.width / cssW : 1;
    return (window.devicePixelRatio || 1) * clamp(zoom, MIN_ZOOM, MAX_ZOOM);
  }

  backingStoreKey(scale) {
    return `${this.canvas.clientWidth}x${this.canvas.clientHeight}@${scale}`;
  }

  resizeBackingStore() {
    const scale = this.displayScale();
    const w = Math.max(1, Math.round(this.canvas.clientWidth * scale));
    const h = Math.max(1, Math.round(this.canvas.clientHeight * scale));
    if (this.canvas.width !== w || this.canvas.height !== h) {
      this.canvas.width = w;
      this.canvas.height = h;
    }
    this.backingKey = this.backingStoreKey(scale);
    return scale;
  }

  /** Called by the frontend whenever the node is drawn: redraw only when the on-screen size changed. */
  refreshIfResized() {
    if (this.backingStoreKey(this.displayScale()) !== this.backingKey) this.draw();
  }

  draw() {
    if (!this.canvas.isConnected || this.canvas.clientWidth === 0 || this.canvas.clientHeight === 0) return;
    const scale = this.resizeBackingStore();
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    const w = this.canvas.clientWidth;
    const h = this.canvas.clientHeight;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(0, 0, w, h);
    this.drawGrid(ctx);
    if (!this.curve) {
      this.drawError(ctx);
      return;
    }
    this.drawPlayhead(ctx);
    const channels = CHANNELS.filter((ch) => ch !== this.activeChannel).concat(this.activeChannel);
    if (this.curve.accentuate !== 1) for (const ch of channels) this.drawCurve(ctx, ch, true);
    for (const ch of channels) this.drawCurve(ctx, ch, false);
    for (const ch of channels) this.drawPoints(ctx, ch);
    this.drawLegend(ctx);
  }

  drawGrid(ctx) {
    const r = this.plotRect();
    ctx.save();
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#8a8a8a";
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (const v of [1, 0.5, 0, -0.5, -1]) {
      const y = Math.round(this.yOf(v)) + 0.5;
      ctx.strokeStyle = v === 0 ? "#555" : "#303030";
      ctx.beginPath();
      ctx.moveTo(r.left, y);
      ctx.lineTo(r.left + r.width, y);
      ctx.stroke();
      if (Number.isInteger(v)) ctx.fillText(v > 0 ? "+1" : String(v), r.left - 5, y);
    }
    const step = NICE_TIME_STEPS.find((s) => (this.duration / s) * MIN_TICK_SPACING_PX <= r.width) ?? NICE_TIME_STEPS.at(-1);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i * step <= this.duration + 1e-9; i += 1) {
      const t = i * step;
      const x = Math.round(this.xOf(t)) + 0.5;
      ctx.strokeStyle = "#303030";
      ctx.beginPath();
      ctx.moveTo(x, r.top);
      ctx.lineTo(x, r.top + r.height);
      ctx.stroke();
      ctx.fillText(`${round(t)}s`, clamp(x, r.left + 8, r.left + r.width - 8), r.top + r.height + 4);
    }
    ctx.strokeStyle = "#444";
    ctx.strokeRect(r.left + 0.5, r.top + 0.5, r.width - 1, r.height - 1);
    ctx.restore();
  }

  drawError(ctx) {
    const r = this.plotRect();
    ctx.save();
    ctx.fillStyle = "rgba(255, 107, 107, 0.08)";
    ctx.fillRect(r.left, r.top, r.width, r.height);
    ctx.fillStyle = "#ff6b6b";
    ctx.font = "12px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("Cannot read the emotion text (see below)", r.left + r.width / 2, r.top + r.height / 2);
    ctx.restore();
  }

  drawPlayhead(ctx) {
    const r = this.plotRect();
    const x = Math.round(this.xOf(this.playhead)) + 0.5;
    ctx.save();
    ctx.strokeStyle = "#d8d8d8";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(x, r.top);
    ctx.lineTo(x, r.top + r.height);
    ctx.stroke();
    ctx.restore();
  }

  /** Polyline of a channel over [0, duration]: straight segments, or sampled smoothstep segments. */
  curvePolyline(channel, effective) {
    const { interpolation, accentuate } = this.curve;
    const points = this.curve[channel];
    const valueOf = effective
      ? (t) => effectiveValueAt(points, t, interpolation, accentuate)
      : (t) => valueAt(points, t, interpolation);
    // Clipping the accentuated value bends even linear segments, so sample whenever it applies.
    const sampled = interpolation === "smooth" || effective;
    const inside = points.map(([t]) => t).filter((t) => t > 0 && t < this.duration);
    const times = [0, ...inside, this.duration];
    const line = [];
    times.forEach((t, i) => {
      if (i > 0 && sampled) {
        const t0 = times[i - 1];
        for (let k = 1; k < SMOOTH_SAMPLES_PER_SEGMENT; k += 1) {
          const ts = t0 + ((t - t0) * k) / SMOOTH_SAMPLES_PER_SEGMENT;
          line.push([ts, valueOf(ts)]);
        }
      }
      line.push([t, valueOf(t)]);
    });
    return line;
  }

  drawCurve(ctx, channel, effective) {
    const line = this.curvePolyline(channel, effective);
    ctx.save();
    ctx.strokeStyle = CHANNEL_STYLE[channel].color;
    ctx.lineWidth = effective ? 1 : channel === this.activeChannel ? 2.25 : 1.75;
    ctx.globalAlpha = effective ? 0.7 : 1;
    if (effective) ctx.setLineDash([4, 3]);
    ctx.lineJoin = "round";
    ctx.beginPath();
    line.forEach(([t, v], i) => (i ? ctx.lineTo(this.xOf(t), this.yOf(v)) : ctx.moveTo(this.xOf(t), this.yOf(v))));
    ctx.stroke();
    ctx.restore();
  }

  drawPoints(ctx, channel) {
    ctx.save();
    this.curve[channel].forEach(([t, v], index) => {
      const selected = this.selected?.channel === channel && this.selected.index === index;
      ctx.beginPath();
      ctx.arc(this.xOf(t), this.yOf(v), selected ? POINT_RADIUS + 1.5 : POINT_RADIUS, 0, 2 * Math.PI);
      ctx.fillStyle = CHANNEL_STYLE[channel].color;
      ctx.fill();
      ctx.lineWidth = selected ? 2 : 1;
      ctx.strokeStyle = selected ? "#ffffff" : "#111111";
      if (t > this.duration) ctx.setLineDash([2, 2]);
      ctx.stroke();
    });
    ctx.restore();
  }

  drawLegend(ctx) {
    const r = this.plotRect();
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "middle";
    const y = PLOT_MARGIN.top / 2;
    let x = r.left + r.width;
    this.legendBoxes = [];
    for (const channel of [...CHANNELS].reverse()) {
      const label = CHANNEL_STYLE[channel].label;
      const width = ctx.measureText(label).width;
      const x0 = x - width - 14;
      ctx.fillStyle = CHANNEL_STYLE[channel].color;
      ctx.fillRect(x0, y - 1.5, 9, 3);
      ctx.fillStyle = channel === this.activeChannel ? "#eeeeee" : "#9a9a9a";
      ctx.fillText(label, x0 + 13, y);
      this.legendBoxes.push({ channel, x0, x1: x, y0: 0, y1: PLOT_MARGIN.top });
      x = x0 - 10;
    }
    ctx.restore();
  }
}

/** Insert [t, v] keeping times sorted; a point already at `t` takes the new value. */
function upsertPoint(points, t, v) {
  const at = points.findIndex(([pt]) => Math.abs(pt - t) < MIN_POINT_GAP_S / 2);
  if (at >= 0) {
    points[at] = [points[at][0], v];
    return;
  }
  const after = points.findIndex(([pt]) => pt > t);
  points.splice(after < 0 ? points.length : after, 0, [t, v]);
}

/** Wrap `owner[method]` so `extra` runs after the original (keeps other extensions' hooks). */
function chainCallback(owner, method, extra) {
  const original = owner[method];
  owner[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}

function attachEditor(node) {
  const textWidget = node.widgets?.find((w) => w.name === TEXT_WIDGET);
  if (!textWidget) {
    console.warn(`[KeyFace] ${NODE_CLASS} node has no "${TEXT_WIDGET}" widget; the curve editor is not shown`);
    return;
  }
  const durationWidget = node.widgets.find((w) => w.name === DURATION_WIDGET);
  const editor = new EmotionCurveEditor(node, textWidget, durationWidget);

  const widget = node.addDOMWidget(EDITOR_WIDGET, "keyface-emotion-curve", editor.root, {
    serialize: false, // the `emotion` text widget holds the value; nothing extra goes to the workflow or prompt
    hideOnZoom: true,
    getMinHeight: () => EDITOR_MIN_HEIGHT,
    onDraw: () => editor.refreshIfResized(),
  });
  widget.serialize = false;
  widget.editor = editor;

  chainCallback(textWidget, "callback", () => editor.onTextWidgetChanged());
  if (durationWidget) chainCallback(durationWidget, "callback", () => editor.syncFromText());
  chainCallback(node, "onConfigure", () => editor.syncFromText()); // workflow load, paste, undo
  chainCallback(node, "onRemoved", () => editor.dispose());

  const minimum = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size[0], minimum[0], MIN_NODE_WIDTH), Math.max(node.size[1], minimum[1])]);
  editor.syncFromText();
}

app.registerExtension({
  name: "KeyFace.EmotionCurveEditor",
  nodeCreated(node) {
    const nodeClass = node.comfyClass ?? node.constructor?.comfyClass ?? node.type;
    if (nodeClass === NODE_CLASS) attachEditor(node);
  },
});
