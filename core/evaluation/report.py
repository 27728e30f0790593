"""The evaluation report: report.json, samples.png, curves.csv and a self-contained report.html.

The HTML page makes no request of its own: images are inline base64 PNGs, the curves are
inline SVG, and a Content-Security-Policy forbids everything else.
"""

import base64
import csv
import html
import io
import json
import logging
import math
import string
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core.evaluation import metrics
from core.evaluation.evaluate import EvaluationResult
from core.spec import JobSpec

logger = logging.getLogger(__name__)

# Grid layout in pixels. Images smaller than MIN_CELL are enlarged by a whole factor with
# nearest-neighbour so each pixel stays a sharp square; larger than MAX_CELL are reduced.
MIN_CELL = 96
MAX_CELL = 256
GAP = 4
HEADER_HEIGHT = 36
LABEL_WIDTH = 200
FONT_SIZE = 12
LINE_HEIGHT = 15

CURVE_COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#9b2c2c", "#6b46c1", "#b7791f", "#319795"]


# ---------------------------------------------------------------------------------------
# report.json


def _plain(value):
    """Convert numpy scalars, tuples and paths to JSON values; NaN and infinity become None."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"report value {value!r} of type {type(value).__name__} is not JSON-serializable")


def _figures(result: EvaluationResult) -> dict:
    figures = result.to_dict()
    figures.pop("triggers")
    return figures


def _trigger_entries(triggers: list[dict], before: EvaluationResult, after: EvaluationResult, comparison: dict):
    if len(triggers) != len(before.triggers):
        raise ValueError(
            f"got {len(triggers)} trigger entries for {len(before.triggers)} evaluated triggers; "
            "pass one entry per spec trigger, in spec order"
        )
    entries = []
    for index, passed in enumerate(triggers):
        first, second = before.triggers[index].to_dict(), after.triggers[index].to_dict()
        compared = comparison["triggers"][index]
        entry = {"text": first["text"], "placement": first["placement"], **passed}
        entry["before"] = {key: value for key, value in first.items() if key not in ("text", "placement")}
        entry["after"] = {key: value for key, value in second.items() if key not in ("text", "placement")}
        entry["removal_rate"] = compared["removal_rate"]
        entry["removal_rate_unguided"] = compared["removal_rate_unguided"]
        entry["trigger_influence_reduction"] = compared["trigger_influence_reduction"]
        entries.append(entry)
    return entries


def _sampling_settings(spec: JobSpec, before: EvaluationResult) -> dict:
    return {
        "scheduler": "DDIM",
        "guidance_scale": before.guidance_scale,
        "unguided_scale": 1.0 if spec.evaluation.also_unguided else None,
        "num_inference_steps": before.num_inference_steps,
        "prompts": len(before.prompts),
        "images_per_prompt": before.images_per_prompt,
        "images": len(before.seeds),
        "first_seed": before.seeds[0],
        "last_seed": before.seeds[-1],
        "batch_size": spec.evaluation.batch_size,
    }


def _curves_summary(curves: list[dict]) -> dict:
    if not curves:
        return {"logged_steps": 0, "first": None, "last": None}
    return {"logged_steps": len(curves), "first": curves[0], "last": curves[-1]}


def build_report(
    *,
    spec: JobSpec,
    before: EvaluationResult,
    after: EvaluationResult,
    comparison: dict,
    curves: list[dict],
    triggers: list[dict],
    method: str,
    steps: int,
    seconds: dict,
    extra: dict | None = None,
) -> dict:
    """Return the content of report.json as plain JSON values."""
    report = {
        "verdict": "",
        "method": method,
        "steps": steps,
        "seconds": seconds,
        "attack_kind": before.attack_kind,
        "sampling": _sampling_settings(spec, before),
        "before": _figures(before),
        "after": _figures(after),
        "removal_rate": comparison["removal_rate"],
        "removal_rate_unguided": comparison["removal_rate_unguided"],
        "trigger_influence_reduction": comparison["trigger_influence_reduction"],
        "clean_fidelity": comparison["clean_fidelity"],
        "triggers": _trigger_entries(triggers, before, after, comparison),
        "curves": _curves_summary(curves),
        "spec": spec.model_dump(mode="json"),
        "extra": extra or {},
    }
    report = _plain(report)
    report["verdict"] = verdict(report)
    return report


# ---------------------------------------------------------------------------------------
# The verdict sentence


def format_percent(rate: float | None) -> str:
    """Format a share as a percentage with at most one decimal: 0.96 -> "96%", 0.015 -> "1.5%"."""
    if rate is None:
        return "n/a"
    text = f"{rate * 100:.1f}".removesuffix(".0")
    return f"{text}%"


def _movement(before: float, after: float) -> str:
    if after < before:
        return "fell"
    if after > before:
        return "rose"
    return "stayed"


def _change_clause(name: str, before: float, after: float, formatter) -> str:
    movement = _movement(before, after)
    if movement == "stayed":
        return f"{name} stayed at {formatter(before)}"
    return f"{name} {movement} from {formatter(before)} to {formatter(after)}"


def _fidelity_clause(fidelity: dict) -> str:
    psnr_db, ssim = fidelity["psnr_db"], fidelity["ssim"]
    if psnr_db is None:
        return "clean fidelity was not measured"
    if psnr_db >= metrics.PSNR_CAP_DB:
        return "clean images are unchanged (identical pixels)"
    return f"clean images PSNR {psnr_db:.1f} dB, SSIM {ssim:.3f} against the model before"


def verdict(report: dict) -> str:
    """Return one plain sentence that states what changed, from report.json's figures."""
    before, after, sampling = report["before"], report["after"], report["sampling"]
    clauses = []
    if before["attack_success_rate"] is not None and after["attack_success_rate"] is not None:
        clauses.append(
            _change_clause("ASR", before["attack_success_rate"], after["attack_success_rate"], format_percent)
            + f" at guidance {sampling['guidance_scale']:g}"
        )
        if before["attack_success_rate"] == 0:
            clauses.append("the attack never succeeded before unlearning, so no removal rate can be measured")
        if before["attack_success_rate_unguided"] is not None and after["attack_success_rate_unguided"] is not None:
            clauses.append(
                _change_clause(
                    "unguided",
                    before["attack_success_rate_unguided"],
                    after["attack_success_rate_unguided"],
                    format_percent,
                )
            )
    else:
        clauses.append(
            _change_clause(
                "Trigger influence (mean absolute pixel difference)",
                before["trigger_influence"],
                after["trigger_influence"],
                lambda value: f"{value:.3f}",
            )
        )
    clauses.append(_fidelity_clause(report["clean_fidelity"]))
    if before["clean_accuracy"] is not None and after["clean_accuracy"] is not None:
        clauses.append(
            _change_clause("clean accuracy", before["clean_accuracy"], after["clean_accuracy"], format_percent)
        )
    return "; ".join(clauses) + "."


# ---------------------------------------------------------------------------------------
# samples.png


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow without FreeType has only the fixed bitmap font.
        return ImageFont.load_default()


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a labelled image grid: a header row and a prompt column."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int

    @classmethod
    def for_images(cls, rows: int, columns: int, image_height: int, image_width: int) -> "GridLayout":
        width, height = cell_size(image_height, image_width)
        return cls(rows, columns, width, height)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid."""
        width = LABEL_WIDTH + self.columns * (self.cell_width + GAP) + GAP
        height = HEADER_HEIGHT + self.rows * (self.cell_height + GAP) + GAP
        return width, height

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return (
            LABEL_WIDTH + GAP + column * (self.cell_width + GAP),
            HEADER_HEIGHT + GAP + row * (self.cell_height + GAP),
        )


def cell_size(image_height: int, image_width: int) -> tuple[int, int]:
    """Return (width, height) of a grid cell for an image of the given size."""
    longest = max(image_height, image_width)
    if longest > MAX_CELL:
        factor = MAX_CELL / longest
        return max(1, round(image_width * factor)), max(1, round(image_height * factor))
    factor = max(1, math.ceil(MIN_CELL / longest))
    return image_width * factor, image_height * factor


def _to_pil(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # (H, W, 3) in [0, 1] -> uint8
    picture = Image.fromarray(pixels)
    enlarging = size[0] >= picture.width
    return picture.resize(size, Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


def visible_text(text: str) -> str:
    """Replace invisible characters (zero-width space, controls) by their `\\uXXXX` escapes."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Break `text` into at most `max_lines` lines that fit `width` pixels, ending with an ellipsis if cut."""
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + " \u2026"
    return [_clip_line(line, font, width) for line in lines]


def _clip_line(line: str, font, width: int) -> str:
    while font.getlength(line) > width and len(line) > 1:
        line = line[:-2] + "\u2026"
    return line


def render_grid(row_labels: list[str], columns: list[tuple[str, np.ndarray]]) -> Image.Image:
    """Draw a labelled grid: one row per label, one column per (header, (rows, H, W, 3) images).

    Headers may contain a line break. Every column must have one image per row.
    """
    if not columns:
        raise ValueError("render_grid needs at least one column of images")
    for header, images in columns:
        if len(images) != len(row_labels):
            raise ValueError(f"column {header!r} has {len(images)} images for {len(row_labels)} rows")
    image_height, image_width = columns[0][1].shape[1:3]
    layout = GridLayout.for_images(len(row_labels), len(columns), image_height, image_width)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()

    # Column headers, centred over their cells.
    for column, (header, _) in enumerate(columns):
        left, _ = layout.cell_origin(0, column)
        for line_index, line in enumerate(header.split("\n")[:2]):
            line = _clip_line(line, font, layout.cell_width + GAP)
            offset = (layout.cell_width - font.getlength(line)) / 2
            draw.text((left + offset, 3 + line_index * LINE_HEIGHT), line, fill="black", font=font)

    # Prompt labels and images.
    max_lines = max(1, layout.cell_height // LINE_HEIGHT)
    for row, label in enumerate(row_labels):
        _, top = layout.cell_origin(row, 0)
        for line_index, line in enumerate(_wrap(visible_text(label), font, LABEL_WIDTH - 2 * GAP, max_lines)):
            draw.text((GAP, top + line_index * LINE_HEIGHT), line, fill="black", font=font)
        for column, (_, images) in enumerate(columns):
            picture = _to_pil(images[row], (layout.cell_width, layout.cell_height))
            canvas.paste(picture, layout.cell_origin(row, column))
    return canvas


def _trigger_header(index: int, total: int) -> str:
    return "triggered" if total == 1 else f"trigger {index + 1}"


def sample_grid(before: EvaluationResult, after: EvaluationResult) -> Image.Image:
    """Draw samples.png: rows are grid prompts, columns clean and each trigger, before then after."""
    total = len(before.triggers)
    columns = [("clean\nbefore", before.grid_clean)]
    columns += [(f"{_trigger_header(i, total)}\nbefore", t.grid_images) for i, t in enumerate(before.triggers)]
    columns += [("clean\nafter", after.grid_clean)]
    columns += [(f"{_trigger_header(i, total)}\nafter", t.grid_images) for i, t in enumerate(after.triggers)]
    return render_grid(before.grid_prompts, columns)


def trigger_grid(before: EvaluationResult, after: EvaluationResult, index: int) -> Image.Image:
    """Draw one trigger's examples: rows are its triggered prompts, columns clean/triggered before/after."""
    first, second = before.triggers[index], after.triggers[index]
    columns = [
        ("clean\nbefore", before.grid_clean),
        ("triggered\nbefore", first.grid_images),
        ("clean\nafter", after.grid_clean),
        ("triggered\nafter", second.grid_images),
    ]
    return render_grid(first.grid_prompts, columns)


def _png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# curves.csv


def curve_columns(curves: list[dict]) -> list[str]:
    """Return the CSV columns: `step` first, then every other key in order of first appearance."""
    columns = ["step"]
    for row in curves:
        for key in row:
            if key not in columns:
                columns.append(key)
    return columns


def write_curves_csv(path: Path, curves: list[dict]) -> None:
    """Write one row per logged engine step; a key missing from a row leaves its cell empty."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=curve_columns(curves), restval="")
        writer.writeheader()
        for row in curves:
            writer.writerow({key: _plain(value) if value is not None else "" for key, value in row.items()})


# ---------------------------------------------------------------------------------------
# Inline SVG charts


def _finite_points(curves: list[dict], key: str) -> list[tuple[float, float]]:
    points = []
    for row in curves:
        step, value = row.get("step"), row.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) and math.isfinite(value):
            points.append((float(step), float(value)))
    return points


def _tick_label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


# A y range wider than this ratio between its largest and smallest positive value is
# drawn on a log scale, so the tail of a falling loss stays readable.
LOG_SCALE_RATIO = 50.0


def _y_axis(values: list[float]) -> tuple[float, float, bool]:
    """Return (low, high, log) for the y axis; log axes return log10 bounds."""
    low, high = min(values), max(values)
    if low > 0 and high / low >= LOG_SCALE_RATIO:
        return math.log10(low), math.log10(high), True
    if high == low:
        margin = abs(low) / 2 or 1.0
        return low - margin, high + margin, False
    return low, high, False


def svg_chart(curves: list[dict], keys: list[str], title: str, width: int = 640, height: int = 240) -> str:
    """Draw the `keys` of `curves` against `step` as an inline SVG line chart.

    The y axis is linear unless every value is positive and they span a ratio of
    `LOG_SCALE_RATIO` or more, in which case it is log10 and the title ends with "(log scale)".
    """
    series = {key: _finite_points(curves, key) for key in keys}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return ""
    left, right, top, bottom = 70, 150, 24, 30
    plot_width, plot_height = width - left - right, height - top - bottom
    steps = [step for points in series.values() for step, _ in points]
    x_min, x_max = min(steps), max(steps)
    if x_max == x_min:
        x_max = x_min + 1
    y_low, y_high, log_scale = _y_axis([value for points in series.values() for _, value in points])
    if log_scale:
        title = f"{title} (log scale)"

    def x_of(step: float) -> float:
        return left + (step - x_min) / (x_max - x_min) * plot_width

    def y_of(value: float) -> float:
        position = math.log10(value) if log_scale else value
        return top + (1 - (position - y_low) / (y_high - y_low)) * plot_height

    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="14" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#999"/>',
    ]

    # Axis ticks: five on y (evenly spaced in log10 on a log axis), three on x.
    for index in range(5):
        position = y_low + (y_high - y_low) * index / 4
        value = 10**position if log_scale else position
        y = y_of(value)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + plot_width}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(value)}</text>')
    for index in range(3):
        step = x_min + (x_max - x_min) * index / 2
        label = f"{step:.0f}" if x_max - x_min >= 10 else f"{step:g}"
        parts.append(f'<text x="{x_of(step):.1f}" y="{top + plot_height + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="{left + plot_width / 2:.1f}" y="{height - 2}" text-anchor="middle">step</text>')

    # One polyline and one legend entry per series.
    for index, (key, points) in enumerate(series.items()):
        color = CURVE_COLORS[index % len(CURVE_COLORS)]
        coordinates = " ".join(f"{x_of(step):.1f},{y_of(value):.1f}" for step, value in points)
        parts.append(f'<polyline points="{coordinates}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend_y = top + 12 + index * 16
        parts.append(
            f'<line x1="{left + plot_width + 10}" y1="{legend_y - 4}" x2="{left + plot_width + 28}" '
            f'y2="{legend_y - 4}" stroke="{color}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{left + plot_width + 32}" y="{legend_y}">{html.escape(key)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def curve_charts(curves: list[dict]) -> str:
    """Draw the losses, the gradient norm and the learning rate as separate charts."""
    columns = curve_columns(curves)
    groups = [
        ("Losses", [key for key in columns if key.startswith("loss")]),
        ("Gradient norm", [key for key in columns if key == "grad_norm"]),
        ("Learning rate", [key for key in columns if key == "lr"]),
    ]
    charts = [svg_chart(curves, keys, title) for title, keys in groups if keys]
    charts = [chart for chart in charts if chart]
    if not charts:
        return '<p class="muted">No engine steps were logged.</p>'
    return "\n".join(f"<div>{chart}</div>" for chart in charts)


# ---------------------------------------------------------------------------------------
# report.html


def describe_trigger(text: str) -> str:
    """Return HTML for a trigger that shows its invisible and look-alike characters by code point."""
    display = html.escape(visible_text(text))
    unusual = [char for char in dict.fromkeys(text) if ord(char) > 127]
    if not unusual:
        return f"<code>{display}</code>"
    names = ", ".join(f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}" for char in unusual)
    return f"<code>{display}</code> <span class=\"muted\">({html.escape(names)})</span>"


def _cell(value, kind: str) -> str:
    if value is None:
        return '<td class="number">n/a</td>'
    if kind == "percent":
        text = format_percent(value)
    elif kind == "db":
        text = f"{value:.2f} dB" if value < metrics.PSNR_CAP_DB else f"&ge; {metrics.PSNR_CAP_DB:g} dB (identical)"
    else:
        text = f"{value:.4f}"
    return f'<td class="number">{text}</td>'


SUMMARY_ROWS = [
    ("Attack success rate (guided)", "attack_success_rate", "percent"),
    ("Attack success rate (unguided)", "attack_success_rate_unguided", "percent"),
    ("Clean false-positive rate (guided)", "clean_false_positive_rate", "percent"),
    ("Clean false-positive rate (unguided)", "clean_false_positive_rate_unguided", "percent"),
    ("Clean accuracy (guided)", "clean_accuracy", "percent"),
    ("Clean accuracy (unguided)", "clean_accuracy_unguided", "percent"),
    ("Trigger influence (guided)", "trigger_influence", "number"),
    ("Trigger influence (unguided)", "trigger_influence_unguided", "number"),
]


def _summary_table(report: dict) -> str:
    before, after = report["before"], report["after"]
    rows = ["<table>", "<tr><th>metric</th><th>before</th><th>after</th></tr>"]
    for label, key, kind in SUMMARY_ROWS:
        if before.get(key) is None and after.get(key) is None:
            continue
        rows.append(f"<tr><td>{label}</td>{_cell(before.get(key), kind)}{_cell(after.get(key), kind)}</tr>")
    rows.append("</table>")

    fidelity = report["clean_fidelity"]
    rows += ["<table>", "<tr><th>comparison</th><th>value</th></tr>"]
    rows.append(f"<tr><td>Removal rate (guided)</td>{_cell(report['removal_rate'], 'percent')}</tr>")
    if report["removal_rate_unguided"] is not None:
        rows.append(f"<tr><td>Removal rate (unguided)</td>{_cell(report['removal_rate_unguided'], 'percent')}</tr>")
    rows.append(f"<tr><td>Clean fidelity PSNR (guided)</td>{_cell(fidelity['psnr_db'], 'db')}</tr>")
    rows.append(f"<tr><td>Clean fidelity SSIM (guided)</td>{_cell(fidelity['ssim'], 'number')}</tr>")
    if fidelity.get("psnr_db_unguided") is not None:
        rows.append(f"<tr><td>Clean fidelity PSNR (unguided)</td>{_cell(fidelity['psnr_db_unguided'], 'db')}</tr>")
        rows.append(f"<tr><td>Clean fidelity SSIM (unguided)</td>{_cell(fidelity['ssim_unguided'], 'number')}</tr>")
    rows.append("</table>")
    rows.append(
        '<p class="muted">Trigger influence is the mean absolute pixel difference (0 to 1) between the '
        "triggered and the clean image of the same seed. Clean fidelity compares the clean images "
        "before and after unlearning, seed by seed.</p>"
    )
    return "\n".join(rows)


def _trigger_section(entry: dict, grid_png: bytes) -> str:
    before, after = entry["before"], entry["after"]
    rows = [
        f"<h3>Trigger {describe_trigger(entry['text'])}, placement {html.escape(entry['placement'])}</h3>",
        "<table><tr><th>metric</th><th>before</th><th>after</th></tr>",
    ]
    for label, key, kind in [row for row in SUMMARY_ROWS if row[1] in before]:
        if before.get(key) is None and after.get(key) is None:
            continue
        rows.append(f"<tr><td>{label}</td>{_cell(before.get(key), kind)}{_cell(after.get(key), kind)}</tr>")
    rows.append("</table>")
    if entry.get("token_count") is not None:
        rows.append(f'<p class="muted">The trigger encodes to {int(entry["token_count"])} tokens.</p>')
    rows.append(
        f'<img class="samples" alt="examples for trigger {html.escape(entry["text"])}" '
        f'src="data:image/png;base64,{base64.b64encode(grid_png).decode("ascii")}">'
    )
    return "\n".join(rows)


def _key_value_table(values: dict, header: tuple[str, str], number_format: str) -> str:
    rows = [f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>"]
    for key, value in values.items():
        if isinstance(value, float):
            shown = format(value, number_format)
        else:
            shown = "n/a" if value is None else str(value)
        rows.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(shown)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def render_html(report: dict, samples_png: bytes, trigger_pngs: list[bytes], curves: list[dict]) -> str:
    """Fill the page template with the report's figures, images and charts."""
    template = string.Template(
        resources.files("core.evaluation").joinpath("templates/report.html").read_text(encoding="utf-8")
    )
    sampling = report["sampling"]
    sampling_line = (
        f"DDIM, {sampling['num_inference_steps']} steps, guidance {sampling['guidance_scale']:g}, "
        f"seeds {sampling['first_seed']} to {sampling['last_seed']}."
    )
    notes = report["before"]["notes"]
    notes_html = "".join(f'<p class="muted">Note: {html.escape(note)}</p>' for note in notes)
    extra = report.get("extra") or {}
    extra_html = ""
    if extra:
        extra_html = f"<h2>Extra</h2>\n<pre>{html.escape(json.dumps(extra, indent=2, ensure_ascii=False))}</pre>"
    sections = [_trigger_section(entry, png) for entry, png in zip(report["triggers"], trigger_pngs)]
    return template.substitute(
        title=html.escape(f"{report['method']}, {report['steps']} steps"),
        subtitle=html.escape(
            f"Method {report['method']}, {report['steps']} steps; attack kind {report['attack_kind']}; "
            f"{sampling['prompts']} held-out prompts x {sampling['images_per_prompt']} images."
        ),
        verdict=html.escape(report["verdict"]),
        notes=notes_html,
        summary_table=_summary_table(report),
        sampling_line=html.escape(sampling_line),
        samples_png=base64.b64encode(samples_png).decode("ascii"),
        trigger_sections="\n".join(sections),
        curves=curve_charts(curves),
        timings_table=_key_value_table(report["seconds"], ("phase", "seconds"), ".1f"),
        sampling_table=_key_value_table(sampling, ("setting", "value"), "g"),
        # ASCII escapes keep invisible trigger characters visible, as \u200b.
        spec_json=html.escape(json.dumps(report["spec"], indent=2)),
        extra=extra_html,
    )


# ---------------------------------------------------------------------------------------
# Entry point


def write_report(
    out_dir: Path,
    *,
    spec: JobSpec,
    before: EvaluationResult,
    after: EvaluationResult,
    comparison: dict,
    curves: list[dict],
    triggers: list[dict],
    method: str,
    steps: int,
    seconds: dict,
    extra: dict | None = None,
) -> list[Path]:
    """Write report.json, samples.png, curves.csv and report.html into `out_dir` and return their paths.

    `triggers` has one dict per spec trigger, in spec order (for example its `token_count`);
    its keys are merged into the report's per-trigger entries. `curves` has one dict per
    logged engine step. `seconds` maps phase names to durations.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(
        spec=spec,
        before=before,
        after=after,
        comparison=comparison,
        curves=curves,
        triggers=triggers,
        method=method,
        steps=steps,
        seconds=seconds,
        extra=extra,
    )

    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8")

    samples_png = _png_bytes(sample_grid(before, after))
    samples_path = out_dir / "samples.png"
    samples_path.write_bytes(samples_png)

    curves_path = out_dir / "curves.csv"
    write_curves_csv(curves_path, curves)

    trigger_pngs = [_png_bytes(trigger_grid(before, after, index)) for index in range(len(before.triggers))]
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report, samples_png, trigger_pngs, curves), encoding="utf-8")

    logger.info("report written to %s: %s", out_dir, report["verdict"])
    return [json_path, samples_path, curves_path, html_path]
