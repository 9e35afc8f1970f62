"""Server-rendered SVG charts: no JavaScript, no external assets, works offline."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date
from html import escape

# Drawing area, in viewBox units; the SVG scales to its container.
WIDTH, HEIGHT = 540, 240
LEFT, RIGHT, TOP, BOTTOM = 40, 40, 34, 36


def nice_ticks(maximum: float, count: int = 4) -> list[float]:
    """Round tick values from 0 up to at least `maximum`: steps of 1, 2 or 5 × 10^k."""
    if maximum <= 0:
        return [0.0, 1.0]
    raw = maximum / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    top = math.ceil(maximum / step - 1e-9) * step
    return [i * step for i in range(round(top / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:g}" if value < 10 else f"{value:,.0f}"


def daily_chart(
    rows: Sequence[tuple[date, int, float]],
    title: str = "Tasks started and transcoding hours per day",
) -> str:
    """An SVG of tasks started per day (bars, left axis) and hours per day (line, right axis).

    `rows` are (day, tasks started, transcoding hours), oldest first. Every text is
    escaped; each bar has a <title> with its figures, shown on hover.
    """
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    base_y = TOP + plot_h
    n = max(len(rows), 1)
    slot = plot_w / n
    bar_w = max(slot * 0.6, 1.0)

    task_ticks = nice_ticks(max((r[1] for r in rows), default=0))
    hour_ticks = nice_ticks(max((r[2] for r in rows), default=0.0))
    task_top, hour_top = task_ticks[-1], hour_ticks[-1]

    def y_tasks(value: float) -> float:
        return base_y - plot_h * value / task_top

    def y_hours(value: float) -> float:
        return base_y - plot_h * value / hour_top

    total_tasks = sum(r[1] for r in rows)
    total_hours = sum(r[2] for r in rows)
    summary = (
        f"{total_tasks} tasks started, {total_hours:.1f} transcoding hours in {len(rows)} days"
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        'aria-labelledby="chart-title chart-desc" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<desc id="chart-desc">{escape(summary)}</desc>',
    ]
    # Grid lines and the left axis (tasks).
    for tick in task_ticks:
        y = y_tasks(tick)
        out.append(
            f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="axis tasks" x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{escape(_fmt(tick))}</text>'
        )
    # The right axis (hours), at the same heights: both scales have their own ticks.
    for tick in hour_ticks:
        y = y_hours(tick)
        out.append(
            f'<text class="axis hours" x="{LEFT + plot_w + 6}" y="{y + 4:.1f}">'
            f"{escape(_fmt(tick))}</text>"
        )
    out.append(
        f'<line class="baseline" x1="{LEFT}" y1="{base_y}" x2="{LEFT + plot_w}" y2="{base_y}"/>'
    )

    points: list[str] = []
    for i, (day, started, hours) in enumerate(rows):
        cx = LEFT + slot * i + slot / 2
        y = y_tasks(started)
        tip = f"{day.isoformat()}: {started} tasks started, {hours:.1f} transcoding hours"
        out.append(
            f'<rect class="bar" x="{cx - bar_w / 2:.1f}" y="{y:.1f}" '
            f'width="{bar_w:.1f}" height="{base_y - y:.1f}"><title>{escape(tip)}</title></rect>'
        )
        # The day of the month under every bar, the month under the first day and each 1st.
        if n <= 31 or i % math.ceil(n / 31) == 0:
            out.append(
                f'<text class="axis day" x="{cx:.1f}" y="{base_y + 14}" text-anchor="middle">'
                f"{day.day}</text>"
            )
        if i == 0 or day.day == 1:
            out.append(
                f'<text class="axis month" x="{cx:.1f}" y="{base_y + 28}" text-anchor="middle">'
                f"{escape(day.strftime('%b'))}</text>"
            )
        points.append(f"{cx:.1f},{y_hours(hours):.1f}")
    if points:
        out.append(f'<polyline class="line" points="{" ".join(points)}"/>')
        for point in points:
            x, y_text = point.split(",")
            out.append(f'<circle class="dot" cx="{x}" cy="{y_text}" r="3"/>')

    # Axis titles and a legend.
    out.append(
        f'<text class="axis-title tasks" x="{LEFT - 6}" y="{TOP - 14}" text-anchor="end">'
        "tasks</text>"
    )
    out.append(
        f'<text class="axis-title hours" x="{LEFT + plot_w + 6}" y="{TOP - 14}">hours</text>'
    )
    legend_x = LEFT + 8
    out.append(
        f'<rect class="bar" x="{legend_x}" y="{TOP - 24}" width="12" height="10"/>'
        f'<text class="legend" x="{legend_x + 16}" y="{TOP - 15}">tasks started</text>'
        f'<line class="line" x1="{legend_x + 120}" y1="{TOP - 19}" '
        f'x2="{legend_x + 140}" y2="{TOP - 19}"/>'
        f'<circle class="dot" cx="{legend_x + 130}" cy="{TOP - 19}" r="3"/>'
        f'<text class="legend" x="{legend_x + 146}" y="{TOP - 15}">transcoding hours</text>'
    )
    out.append("</svg>")
    return "\n".join(out)
