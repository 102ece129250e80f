"""What a run leaves for people to look at: image grids, the reward curve, TensorBoard events, optional W&B.

Run-directory files written here (the rest of the layout is in DESIGN.md):

    images/epoch_NNNN.png       the epoch's samples, each captioned with its prompt and reward
    images/eval_epoch_NNNN.png  held-out evaluation: rows = prompts, columns = fixed seeds (same in every epoch)
    images/eval_strips.png      held-out evaluation: a row per (prompt, seed), the evaluated epochs side by side
    eval/epoch_NNNN.json        held-out evaluation scores, prompts, seeds and image files
    eval/epoch_NNNN/II.png      the held-out images themselves (II = position in the JSON's lists)
    reward_curve.png            reward mean +- std per epoch, and the evaluation curves
    tb/                         TensorBoard events: every numeric metric at step = epoch, and the grids

`RunArtifacts` is cheap enough to call every epoch: one grid of at most `logging.images_per_epoch` cells, a few
scalars, and a small matplotlib figure re-drawn from metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from services.config import TrainConfig
from services.credentials import redact_urls

if TYPE_CHECKING:
    from services.evaluation import EvalResult

logger = logging.getLogger(__name__)

CELL_PX = 256  # side of one grid cell: 64 px tiny-model images are upscaled, 512 px SD images downscaled
CAPTION_FONT_PX = 13
MAX_PROMPT_LINES = 3


# ---- image grids ---------------------------------------------------------------------------------------------------
def _font(size: int = CAPTION_FONT_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; the last kept line ends in an ellipsis when text is cut."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines or [""]


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Scale to `side` pixels wide: NEAREST when upscaling (keeps tiny images crisp), LANCZOS when shrinking."""
    w, h = image.size
    height = max(1, round(h * side / w))
    resample = Image.Resampling.NEAREST if w < side else Image.Resampling.LANCZOS
    return image.convert("RGB").resize((side, height), resample)


def captioned_grid(
    images: Sequence[Image.Image],
    captions: Sequence[Sequence[str]],
    columns: int | None = None,
    cell: int = CELL_PX,
) -> Image.Image:
    """Images in a grid, each with caption lines under it.

    `captions[i]` is a list of strings for image i: the first is word-wrapped (the prompt, up to 3 lines), the others
    are single lines (scores). `columns` defaults to a near-square layout.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("captioned_grid needs at least one image")
    font = _font()
    line_px = CAPTION_FONT_PX + 3
    pad = 4
    cells = [_fit(im, cell) for im in images]
    text = [
        _wrap(c[0], font, cell - 2 * pad, MAX_PROMPT_LINES) + [str(s) for s in c[1:]] if c else [""]
        for c in captions
    ]
    image_h = max(c.size[1] for c in cells)
    cell_h = image_h + pad + line_px * max(len(t) for t in text) + pad
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(cells, text, strict=True)):
        x = pad + (i % columns) * (cell + pad)
        y = pad + (i // columns) * (cell_h + pad)
        grid.paste(im, (x, y))
        for j, line in enumerate(lines):
            draw.text((x + pad, y + image_h + pad + j * line_px), line, fill="black", font=font)
    return grid


def _score_text(name: str, value: float) -> str:
    return f"{name}: {value:.4g}"


def sample_grid(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    rewards: Sequence[float],
    limit: int,
    reward_name: str,
) -> Image.Image:
    """The first `limit` samples of an epoch, captioned with prompt and reward."""
    n = min(limit, len(images))
    captions = [[prompts[i], _score_text(reward_name, float(rewards[i]))] for i in range(n)]
    return captioned_grid(list(images[:n]), captions)


def eval_grid(result: EvalResult) -> Image.Image:
    """Rows = prompts, columns = the fixed seeds; each cell captioned with prompt, seed and every score."""
    captions = []
    for i, (prompt, seed) in enumerate(zip(result.prompts, result.seeds, strict=True)):
        scores = [_score_text(name, values[i]) for name, values in result.scores.items()]
        captions.append([prompt, f"seed {seed}", *scores])
    columns = max(1, len(result.images) // max(1, len(dict.fromkeys(result.prompts))))
    return captioned_grid(result.images, captions, columns=columns)


def write_eval_files(run_dir: str | Path, result: EvalResult) -> tuple[Path, Path]:
    """eval/epoch_NNNN.json (scores, prompts, seeds, metrics, image files), each image as eval/epoch_NNNN/II.png,
    images/eval_epoch_NNNN.png, and a refreshed images/eval_strips.png; returns the JSON and grid paths."""
    run_dir = Path(run_dir)
    image_dir = run_dir / "eval" / f"epoch_{result.epoch:04d}"
    image_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(result.images):
        image.save(image_dir / f"{i:02d}.png")
        files.append(f"eval/{image_dir.name}/{i:02d}.png")
    json_path = run_dir / "eval" / f"epoch_{result.epoch:04d}.json"
    json_path.write_text(json.dumps({**result.to_json(), "files": files}, indent=1))
    grid_path = run_dir / "images" / f"eval_epoch_{result.epoch:04d}.png"
    eval_grid(result).save(grid_path)
    strips = eval_strips_image(run_dir)
    if strips is not None:
        strips.save(run_dir / "images" / "eval_strips.png")
    return json_path, grid_path


@dataclass
class EvalStrip:
    """One held-out prompt and seed across the evaluated epochs."""

    prompt: str
    seed: int
    cells: list[tuple[int, str, dict[str, float]]]  # (epoch, image path relative to the run dir, scores)


def eval_strips(run_dir: str | Path) -> list[EvalStrip]:
    """The held-out evaluation as one strip per (prompt, seed), epochs in order (from eval/epoch_NNNN.json files
    that list their images)."""
    strips: dict[tuple[str, int], EvalStrip] = {}
    for path in sorted(Path(run_dir).glob("eval/epoch_*.json")):
        data = json.loads(path.read_text())
        for i, file in enumerate(data.get("files", [])):
            key = (data["prompts"][i], int(data["seeds"][i]))
            strip = strips.setdefault(key, EvalStrip(key[0], key[1], []))
            scores = {name: float(values[i]) for name, values in data["scores"].items()}
            strip.cells.append((int(data["epoch"]), file, scores))
    for strip in strips.values():
        strip.cells.sort(key=lambda cell: cell[0])
    return list(strips.values())


def eval_strips_image(run_dir: str | Path, max_epochs: int = 8) -> Image.Image | None:
    """images/eval_strips.png: a row per held-out (prompt, seed), its evaluated epochs side by side (at most
    `max_epochs` of them, evenly spaced, first and last included)."""
    strips = eval_strips(run_dir)
    if not strips:
        return None
    epochs = sorted({cell[0] for strip in strips for cell in strip.cells})
    if len(epochs) > max_epochs:
        picks = np.linspace(0, len(epochs) - 1, max_epochs).round().astype(int)
        epochs = [epochs[i] for i in sorted(set(picks.tolist()))]
    images, captions = [], []
    for strip in strips:
        by_epoch = {cell[0]: cell for cell in strip.cells}
        for epoch in epochs:
            cell = by_epoch.get(epoch)
            if cell is None:
                images.append(Image.new("RGB", (CELL_PX // 4, CELL_PX // 4), "white"))
                captions.append([f"{strip.prompt} / seed {strip.seed}", f"epoch {epoch}: -"])
                continue
            images.append(Image.open(Path(run_dir) / cell[1]))
            scores = " / ".join(f"{value:.4g}" for value in cell[2].values())
            captions.append([f"{strip.prompt} / seed {strip.seed}", f"epoch {epoch}: {scores}"])
    grid = captioned_grid(images, captions, columns=len(epochs), cell=CELL_PX * 5 // 8)
    names = " / ".join(dict.fromkeys(name for strip in strips for cell in strip.cells for name in cell[2]))
    return _with_title(grid, f"held-out evaluation ({names}): rows = prompt and seed, columns = epochs")


def _with_title(image: Image.Image, title: str) -> Image.Image:
    """`image` under one line of text."""
    line_px = CAPTION_FONT_PX + 8
    out = Image.new("RGB", (image.width, image.height + line_px), "white")
    ImageDraw.Draw(out).text((4, 4), title, fill="black", font=_font())
    out.paste(image, (0, line_px))
    return out


# ---- metrics -------------------------------------------------------------------------------------------------------
def numeric_items(row: dict[str, Any]) -> dict[str, float]:
    """The row's real-number values as floats; None, bools, strings and lists are skipped."""
    return {k: float(v) for k, v in row.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> rows (a missing file is an empty run; a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable line in %s", path)
    return rows


def read_eval_files(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """epoch -> flat eval metrics from eval/epoch_NNNN.json (written during training or by `ddpo eval`)."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval/epoch_*.json")):
        data = json.loads(path.read_text())
        out[int(data["epoch"])] = data.get("metrics", {})
    return out


def eval_points(run_dir: str | Path, rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """epoch -> eval metrics: `eval/...` keys of metrics.jsonl rows, overridden by eval/*.json (recomputed later)."""
    points: dict[int, dict[str, float]] = {}
    for row in rows:
        found = {k: v for k, v in numeric_items(row).items() if k.startswith("eval/")}
        if found and "epoch" in row:
            points[int(row["epoch"])] = found
    for epoch, metrics in read_eval_files(run_dir).items():
        points.setdefault(epoch, {}).update(metrics)
    return dict(sorted(points.items()))


def _eval_reward_names(points: dict[int, dict[str, float]]) -> list[str]:
    names = {k[len("eval/") : -len("_mean")] for m in points.values() for k in m if k.endswith("_mean")}
    return sorted(names)


def plot_reward_curve(run_dir: str | Path, reward_name: str, out: str | Path) -> Path | None:
    """reward_curve.png: training reward mean +- std per epoch and each eval reward (None if nothing to plot).

    Panel 1 shows the optimised reward on training prompts and, if evaluated, on the held-out prompts; one more
    panel per watched reward (their scales differ). Uses the Agg canvas directly: no pyplot global state.
    """
    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "epoch" in r and "reward_mean" in r]
    points = eval_points(run_dir, rows)
    if not rows and not points:
        return None
    watched = [n for n in _eval_reward_names(points) if n != reward_name]
    fig = Figure(figsize=(5.5 * (1 + len(watched)), 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(watched), squeeze=False)[0]
    if rows:
        epochs = np.array([r["epoch"] for r in rows], dtype=float)
        mean = np.array([r["reward_mean"] for r in rows], dtype=float)
        std = np.array([r.get("reward_std") or 0.0 for r in rows], dtype=float)
        axes[0].plot(epochs, mean, marker="o", ms=3, label="train (mean \u00b1 std)")
        axes[0].fill_between(epochs, mean - std, mean + std, alpha=0.25)
    for ax, name in zip(axes, [reward_name, *watched], strict=True):
        series = [(e, m[f"eval/{name}_mean"], m.get(f"eval/{name}_std", 0.0)) for e, m in points.items()
                  if f"eval/{name}_mean" in m]  # fmt: skip
        if series:
            e, mu, sd = (np.array(v, dtype=float) for v in zip(*series, strict=True))
            ax.plot(e, mu, marker="s", ms=4, color="tab:orange", label="held-out eval (mean \u00b1 std)")
            ax.fill_between(e, mu - sd, mu + sd, color="tab:orange", alpha=0.2)
        ax.set_title(name if name == reward_name else f"{name} (watched, not optimised)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize=8)
    out = Path(out)
    fig.savefig(out)
    return out


# ---- the logger the training loop holds ----------------------------------------------------------------------------
class RunArtifacts:
    """Per-epoch images, curves, TensorBoard and W&B for one run directory.

    The training loop calls `log_epoch` after writing each metrics.jsonl row, `log_eval` after each held-out
    evaluation, `write_curves` when it wants reward_curve.png refreshed, and `close` at the end.
    """

    def __init__(self, run_dir: str | Path, cfg: TrainConfig, resume_epoch: int | None = None) -> None:
        """`resume_epoch`: when resuming, the first epoch this process logs; TensorBoard then hides the older
        events at that step or later (written by the crashed process after its last checkpoint)."""
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        (self.run_dir / "images").mkdir(parents=True, exist_ok=True)
        self._tb = None
        if cfg.logging.tensorboard:
            # lazily: tensorboard's writer pulls in TensorFlow-compatible protobufs, and runs may turn it off
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=resume_epoch)
        self._wandb = self._init_wandb()

    def _init_wandb(self) -> Any:
        project = self.cfg.logging.wandb_project
        if not project:
            return None
        try:
            import wandb  # lazily: an optional dependency, not installed by default
        except ImportError:
            logger.warning("logging.wandb_project=%r but wandb is not installed; W&B logging is off", project)
            return None
        # One W&B run per run directory: a resumed run continues the same W&B run.
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = wandb.init(
            project=project,
            name=self.run_dir.name,
            dir=str(self.run_dir),
            config=redact_urls(json.loads(self.cfg.model_dump_json())),
            id=run_id,
            resume="allow",
        )
        if run_id is None and getattr(run, "id", None):
            id_file.write_text(str(run.id))
        return run

    def log_epoch(
        self,
        row: dict[str, Any],
        images: Sequence[Image.Image] = (),
        prompts: Sequence[str] = (),
        rewards: Sequence[float] = (),
    ) -> Path | None:
        """Scalars of one metrics.jsonl row (step = row["epoch"]) and the epoch's sample grid; returns the grid path.

        `eval/...` keys are skipped here (`log_eval` writes them), as are None and non-numeric values.
        """
        epoch = int(row["epoch"])
        scalars = {k: v for k, v in numeric_items(row).items() if k != "epoch" and not k.startswith("eval/")}
        grid_path = None
        grid = None
        limit = self.cfg.logging.images_per_epoch
        if limit and images:
            if not len(images) == len(prompts) == len(rewards):
                raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(rewards)} rewards")
            grid = sample_grid(images, prompts, rewards, limit, self.cfg.reward.name)
            grid_path = self.run_dir / "images" / f"epoch_{epoch:04d}.png"
            grid.save(grid_path)
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, global_step=epoch)
            if grid is not None:
                self._tb.add_image("images/samples", np.asarray(grid), global_step=epoch, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb  # lazily: optional (only reached when _init_wandb imported it)

            payload: dict[str, Any] = dict(scalars)
            if grid is not None:
                payload["images/samples"] = wandb.Image(grid)
            self._wandb.log(payload, step=epoch)
        return grid_path

    def log_eval(self, epoch: int, result: EvalResult) -> Path:
        """eval/epoch_NNNN.json, images/eval_epoch_NNNN.png and `eval/...` scalars at step = epoch; returns the grid."""
        _, grid_path = write_eval_files(self.run_dir, result)
        metrics = result.metrics()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, global_step=epoch)
            self._tb.add_image(
                "images/eval", np.asarray(Image.open(grid_path)), global_step=epoch, dataformats="HWC"
            )
            self._tb.flush()
        if self._wandb is not None:
            import wandb  # lazily: optional (only reached when _init_wandb imported it)

            self._wandb.log({**metrics, "images/eval": wandb.Image(str(grid_path))}, step=epoch)
        return grid_path

    def write_curves(self) -> Path | None:
        """reward_curve.png from metrics.jsonl and eval/*.json (None while there is nothing to plot)."""
        return plot_reward_curve(self.run_dir, self.cfg.reward.name, self.run_dir / "reward_curve.png")

    def close(self) -> None:
        """Flush and close the writers (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunArtifacts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
