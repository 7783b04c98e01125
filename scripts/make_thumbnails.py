"""Writes the template thumbnails ``workflows/<name>.jpg`` (beside each UI-format ``workflows/<name>.json``, where
ComfyUI's template browser looks for them: ``/api/workflow_templates/<pack>/<name>.jpg``) and the Registry icon
``docs/icon.png``.

    python scripts/make_thumbnails.py

Each thumbnail is drawn from its template alone: the portrait its Load Image node reads (the sample input in
``workflows/inputs/``), the heading of its Markdown note, the KeyFace nodes it runs in execution order, and the
valence/arousal curve of a KeyFace Emotion Curve node. Not a generated frame: on the demo weights (the only ones
that can run here) the video is noise, which would misrepresent the template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"
ICON = ROOT / "docs" / "icon.png"
THUMBNAIL_SIZE = 512  # the template card is 16 rem (256 CSS px) wide and square; 512 keeps it sharp at 2x
ICON_SIZE = 256
JPEG_QUALITY = 85
FONT_FILES = ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
BAND = (24, 20, 28)  # the dark band under the text
VALENCE_COLOUR, AROUSAL_COLOUR = (255, 196, 64), (96, 200, 255)


def font(size: int) -> ImageFont.ImageFont:
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size)


def note_heading(workflow: dict) -> str:
    """The first line of the first Markdown note, without its ``#`` marks."""
    text = next(node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "MarkdownNote")
    return text.splitlines()[0].lstrip("# ").strip()


def node_title(node: dict) -> str:
    if node.get("title"):
        return node["title"]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", node["type"].removeprefix("KeyFace"))


def keyface_chain(workflow: dict) -> list[str]:
    """Titles of the graph's KeyFace nodes in execution order (ComfyUI's ``order`` field)."""
    nodes = sorted((node for node in workflow["nodes"] if node["type"].startswith("KeyFace")), key=lambda n: n["order"])
    return [node_title(node) for node in nodes]


def portrait(workflow: dict) -> Image.Image:
    """The image the template's Load Image node reads, square, RGB."""
    loader = next(node for node in workflow["nodes"] if node["type"] == "LoadImage")
    image = Image.open(INPUTS / loader["widgets_values"][0]).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def emotion_curve(workflow: dict) -> dict | None:
    """The valence/arousal points of a KeyFace Emotion Curve node, if the template has one."""
    for node in workflow["nodes"]:
        if node["type"] == "KeyFaceEmotionCurve":
            for value in node["widgets_values"]:
                if isinstance(value, str) and value.lstrip().startswith("{"):
                    return json.loads(value)
    return None


def draw_curve(draw: ImageDraw.ImageDraw, curve: dict, box: tuple[int, int, int, int]) -> None:
    """Valence and arousal over time as two polylines (straight between the points) in ``box``, -1..1 high."""
    left, top, right, bottom = box
    points = {name: curve[name] for name in ("valence", "arousal")}
    end = max(time for series in points.values() for time, _ in series) or 1.0
    draw.rectangle(box, fill=BAND)
    middle = (top + bottom) / 2
    draw.line([(left, middle), (right, middle)], fill=(90, 90, 90), width=1)
    for name, colour in (("valence", VALENCE_COLOUR), ("arousal", AROUSAL_COLOUR)):
        series = points[name] + [[end * 1.15, points[name][-1][1]]]
        xy = [
            (left + (right - left) * min(time / (end * 1.15), 1.0), middle - (bottom - top) / 2 * 0.9 * value)
            for time, value in series
        ]
        draw.line(xy, fill=colour, width=4, joint="curve")
    small = font(16)
    draw.text((left + 8, bottom - 22), "valence", fill=VALENCE_COLOUR, font=small)
    draw.text(
        (left + 16 + draw.textlength("valence", font=small), bottom - 22), "arousal", fill=AROUSAL_COLOUR, font=small
    )


def thumbnail(workflow: dict) -> Image.Image:
    """``THUMBNAIL_SIZE`` square RGB: the portrait, the note's heading, the KeyFace chain (and emotion curve)."""
    size = THUMBNAIL_SIZE
    image = portrait(workflow).resize((size, size), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(image)
    curve = emotion_curve(workflow)
    if curve is not None:
        draw_curve(draw, curve, (16, 16, size - 16, 120))  # above the face
    band_top = size - 176
    shade = np.asarray(image, dtype=np.float32)
    shade[band_top:] = shade[band_top:] * 0.25 + np.asarray(BAND, dtype=np.float32) * 0.75
    image = Image.fromarray(shade.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.text((20, band_top + 14), note_heading(workflow), fill=(255, 255, 255), font=font(30))
    chain = " \u2192 ".join(keyface_chain(workflow))
    lines, line, small = [], "", font(17)
    for word in chain.split(" "):
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=small) > size - 40:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    for index, text in enumerate(lines[:5]):
        draw.text((20, band_top + 60 + 22 * index), text, fill=(210, 210, 210), font=small)
    return image


def icon() -> Image.Image:
    """``ICON_SIZE`` square: the sample portrait with the pack's name."""
    workflow = json.loads((WORKFLOWS / "keyface_portrait_speech.json").read_text())
    image = portrait(workflow).resize((ICON_SIZE, ICON_SIZE), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, ICON_SIZE - 64, ICON_SIZE, ICON_SIZE), fill=BAND)
    title = font(40)
    width = draw.textlength("KeyFace", font=title)
    draw.text(((ICON_SIZE - width) / 2, ICON_SIZE - 58), "KeyFace", fill=(255, 255, 255), font=title)
    return image


def main() -> None:
    for path in sorted(WORKFLOWS.glob("*.json")):
        target = path.with_suffix(".jpg")
        thumbnail(json.loads(path.read_text())).save(target, "JPEG", quality=JPEG_QUALITY, optimize=True)
        print(f"wrote {target.relative_to(ROOT)} ({target.stat().st_size // 1024} KB)")
    icon().save(ICON, "PNG", optimize=True)
    print(f"wrote {ICON.relative_to(ROOT)} ({ICON.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
