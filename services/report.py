"""`ddpo report RUN_DIR`: one HTML page that shows a run -- curves, held-out grids across epochs, samples, config.

The page is RUN_DIR/report.html. The reward curve is embedded (base64 PNG) so the page shows it even when copied
alone; the image grids are linked by paths relative to the run directory, so the page stays small and opens from the
run directory (or a copy of it) without a server.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from services.artifacts import eval_points, eval_strips, plot_reward_curve, read_metrics

logger = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
.guard { background: #fee; border: 1px solid #c33; padding: .5em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
th { background: #f4f4f4; position: sticky; top: 0; } td { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow: auto; max-height: 40em; } figure { margin: 1em 0; } figcaption { font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; } pre { background: #f7f7f7; padding: 1em; overflow: auto; }
table.strips td, th.strip { text-align: center; vertical-align: top; font-size: .8em; }
img.strip { width: 128px; image-rendering: pixelated; }
"""


def _epoch_of(path: Path) -> int:
    match = re.search(r"(\d+)\.png$", path.name)
    return int(match.group(1)) if match else -1


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _figures(run_dir: Path, paths: list[Path], label: str) -> str:
    return "".join(
        f'<figure><figcaption>{label} {_epoch_of(p)}</figcaption><a href="{quote(p.relative_to(run_dir).as_posix())}">'
        f'<img loading="lazy" src="{quote(p.relative_to(run_dir).as_posix())}" alt="{label} {_epoch_of(p)}"></a>'
        "</figure>"
        for p in paths
    )


def _strips_table(run_dir: Path) -> str:
    """The held-out images as one row per (prompt, seed), the evaluated epochs side by side, scores underneath."""
    strips = eval_strips(run_dir)
    if not strips:
        return ""
    epochs = sorted({cell[0] for strip in strips for cell in strip.cells})
    head = "<th>prompt / seed</th>" + "".join(f"<th>epoch {e}</th>" for e in epochs)
    body = []
    for strip in strips:
        by_epoch = {cell[0]: cell for cell in strip.cells}
        cells = [f'<th class="strip">{html.escape(strip.prompt)}<br>seed {strip.seed}</th>']
        for epoch in epochs:
            cell = by_epoch.get(epoch)
            if cell is None:
                cells.append("<td></td>")
                continue
            src = quote(cell[1])
            scores = "<br>".join(f"{html.escape(k)} {_fmt(v)}" for k, v in cell[2].items())
            cells.append(
                f'<td class="strip"><img class="strip" src="{src}" alt="epoch {epoch}"><br>{scores}</td>'
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table class="strips"><tr>{head}</tr>{"".join(body)}</table></div>'


def _curve_section(run_dir: Path, reward_name: str) -> str:
    curve = plot_reward_curve(run_dir, reward_name, run_dir / "reward_curve.png")
    if curve is None:
        return "<p>No metrics yet.</p>"
    data = base64.b64encode(curve.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="reward curve">'


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html (and refresh reward_curve.png); returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.exists() else ""
    config = yaml.safe_load(config_text) or {}
    reward_name = config.get("reward", {}).get("name", "reward")
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = eval_points(run_dir, rows)
    eval_grids = sorted((run_dir / "images").glob("eval_epoch_*.png"), key=_epoch_of)
    sample_grids = sorted((run_dir / "images").glob("epoch_*.png"), key=_epoch_of)
    title = f"DDPO run {config.get('run_name', '')} ({run_dir.resolve().name})"
    last = rows[-1] if rows else {}
    summary = (
        f"{len(rows)} epochs logged; reward <b>{html.escape(reward_name)}</b>"
        + (
            f", last epoch mean {_fmt(last.get('reward_mean'))} \u00b1 {_fmt(last.get('reward_std'))}"
            if last
            else ""
        )
        + f". Written {time.strftime('%Y-%m-%d %H:%M:%S')}."
    )
    eval_table = _table([{"epoch": e, **m} for e, m in evals.items()]) if evals else ""
    guard_path = run_dir / "guard.jsonl"
    guard_events = (
        [json.loads(line) for line in guard_path.read_text().splitlines()] if guard_path.exists() else []
    )
    guard_html = "".join(
        f"<p class='guard'><b>Reward-hacking guard ({html.escape(e['action'])}):</b> {html.escape(e['reason'])}</p>"
        for e in guard_events
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{summary}</p>",
        guard_html,
        "<h2>Reward curve</h2>",
        _curve_section(run_dir, reward_name),
        "<h2>Held-out evaluation</h2>",
        "<p>The same prompts and seeds at every evaluated epoch: one row per prompt and seed, the epochs side by "
        "side, so the change is visible at a glance.</p>"
        if eval_grids or evals
        else "<p>No held-out evaluation in this run (set evaluation.every and evaluation.prompts, or run "
        "<code>ddpo eval RUN_DIR</code>).</p>",
        _strips_table(run_dir),
        eval_table,
        f"<details><summary>{len(eval_grids)} evaluation grids (one per epoch)</summary>"
        + _figures(run_dir, eval_grids, "evaluation after epoch")
        + "</details>"
        if eval_grids
        else "",
        "<h2>Samples per epoch</h2>",
        f"<details{' open' if len(sample_grids) <= 4 else ''}><summary>{len(sample_grids)} grids</summary>"
        + _figures(run_dir, sample_grids, "epoch")
        + "</details>",
        "<h2>Metrics</h2>",
        _table(rows) if rows else "<p>metrics.jsonl is empty.</p>",
        "<h2>Config</h2>",
        f"<pre>{html.escape(config_text)}</pre>",
        "</body></html>",
    ]
    out = run_dir / "report.html"
    out.write_text("\n".join(parts))
    logger.info("report written: %s", out)
    return out
