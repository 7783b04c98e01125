// Minimal stand-in for ComfyUI's `scripts/app.js`, served at /scripts/app.js by tests/test_web_widget.py.
//
// It provides just what the KeyFace emotion-curve extension touches, with the behaviour of the real
// frontend (1.x) where it matters:
// - `app.registerExtension(ext)` collects extensions; `nodeCreated(node)` runs after a node's widgets exist.
// - A multiline STRING widget is a DOM widget around a <textarea>: its `value` setter stores the text
//   and then calls the widget's `callback`; typing calls the callback too.
// - `node.addDOMWidget(name, type, element, options)` returns a widget whose `value` goes through
//   options.getValue/setValue; its height is options.getMinHeight() or the space left in the node.
// - `node.configure({widgets_values})` assigns values to widgets whose `serialize` is not false, in
//   order, then calls `node.onConfigure` (workflow load).
// It is NOT a copy of ComfyUI: no graph canvas, no links, no zoom.

const TITLE_HEIGHT = 26;
const WIDGET_GAP = 4;
const TEXT_WIDGET_HEIGHT = 84;
const NUMBER_WIDGET_HEIGHT = 24;

const extensions = [];

export const app = {
  extensions,
  graph: { setDirtyCanvas() {} },
  canvas: { setDirty() {} },
  registerExtension(extension) {
    if (!extension?.name) throw new Error("extension needs a name");
    extensions.push(extension);
  },
};

class FakeNode {
  constructor(type, host) {
    this.type = type;
    this.comfyClass = type;
    this.size = [460, 120];
    this.widgets = [];
    this.dirtyCount = 0;
    this.el = document.createElement("div");
    this.el.className = "fake-node";
    this.el.dataset.nodeType = type;
    const title = document.createElement("div");
    title.className = "fake-node-title";
    title.textContent = "KeyFace Emotion Curve";
    title.style.height = `${TITLE_HEIGHT}px`;
    this.body = document.createElement("div");
    this.body.className = "fake-node-body";
    this.el.append(title, this.body);
    host.append(this.el);
  }

  addDOMWidget(name, type, element, options = {}) {
    const widget = {
      name,
      type,
      element,
      options,
      get value() {
        return options.getValue?.() ?? "";
      },
      set value(v) {
        options.setValue?.(v);
        this.callback?.(this.value);
      },
    };
    element.dataset.widgetName = name;
    this.body.append(element);
    this.widgets.push(widget);
    this.layout();
    return widget;
  }

  addMultilineText(name, initial) {
    const textarea = document.createElement("textarea");
    textarea.className = "fake-textarea";
    textarea.value = initial;
    const widget = this.addDOMWidget(name, "customtext", textarea, {
      getValue: () => textarea.value,
      setValue: (v) => { textarea.value = v; },
    });
    textarea.addEventListener("input", () => widget.callback?.(widget.value));
    return widget;
  }

  addNumber(name, initial) {
    const row = document.createElement("label");
    row.className = "fake-number";
    row.textContent = `${name} `;
    const input = document.createElement("input");
    input.type = "number";
    input.step = "0.1";
    input.value = String(initial);
    row.append(input);
    this.body.append(row);
    const widget = { name, type: "number", value: initial, options: { min: 0.04, step: 0.1 }, row };
    input.addEventListener("change", () => {
      widget.value = Number(input.value);
      widget.callback?.(widget.value);
    });
    this.widgets.push(widget);
    this.layout();
    return widget;
  }

  widgetHeight(w) {
    if (w.type === "customtext") return TEXT_WIDGET_HEIGHT;
    if (w.type === "number") return NUMBER_WIDGET_HEIGHT;
    return w.options.getMinHeight?.() ?? 50;
  }

  computeSize() {
    const height = this.widgets.reduce((h, w) => h + this.widgetHeight(w) + WIDGET_GAP, TITLE_HEIGHT);
    return [300, height];
  }

  setSize(size) {
    this.size = [size[0], size[1]];
    this.layout();
  }

  layout() {
    this.el.style.width = `${this.size[0]}px`;
    this.el.style.height = `${this.size[1]}px`;
    const fixed = this.widgets.filter((w) => w.type === "customtext" || w.type === "number");
    const free = this.size[1] - TITLE_HEIGHT - fixed.reduce((h, w) => h + this.widgetHeight(w) + WIDGET_GAP, 0);
    const custom = this.widgets.filter((w) => !fixed.includes(w));
    for (const w of this.widgets) {
      const el = w.element ?? w.row;
      const h = fixed.includes(w) ? this.widgetHeight(w) : Math.max(this.widgetHeight(w), free / custom.length - WIDGET_GAP);
      el.style.height = `${h}px`;
    }
  }

  setDirtyCanvas() {
    this.dirtyCount += 1;
  }

  configure(info) {
    const values = [...info.widgets_values];
    for (const w of this.widgets) {
      if (w.serialize === false || !values.length) continue;
      w.value = values.shift();
      if (w.row) w.row.querySelector("input").value = String(w.value);
    }
    this.onConfigure?.(info);
  }

  serialize() {
    return { type: this.type, widgets_values: this.widgets.filter((w) => w.serialize !== false).map((w) => w.value) };
  }
}

/** Import every extension file the way the frontend does (the server lists them). */
export async function loadExtensions(urls) {
  for (const url of urls) await import(url);
}

/** Create a node like the frontend: widgets from the node definition, then the `nodeCreated` hooks. */
export async function createNode(type, host, { emotion = "neutral", duration = 10 } = {}) {
  const node = new FakeNode(type, host);
  node.addMultilineText("emotion", emotion);
  node.addNumber("duration", duration);
  for (const ext of extensions) await ext.nodeCreated?.(node, app);
  return node;
}
