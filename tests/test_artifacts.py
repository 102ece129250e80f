"""Run-directory artifacts as the training loop's recorder (`learner.recorder.EpochRecorder`) leaves them: TensorBoard
events read back, grids, the reward curve, W&B calls, report.html. The held-out sampling and the VAE decode are stood
in for (recorded); everything else is the recorder's own code path."""

from __future__ import annotations

import contextlib
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.recorder import EpochRecorder
from services.app.driver import make_run_dir
from services.artifacts import CELL_PX
from services.evaluation import EvalResult
from services.report import write_report
from services.trajectory import ScoredTrajectory

PROMPTS = ["a cat", "a dog", "a bird", "a fish", "a cat", "a dog"]
EVAL = {"every": 2, "prompts": ["a fox", "a cow"], "num_per_prompt": 2, "seed": 5,
        "watch_rewards": ["jpeg_incompressibility"]}  # fmt: skip


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _row(epoch: int) -> dict:
    # what the epoch loop hands the recorder; approx_kl is None before the first update
    return {"epoch": epoch, "policy_version": epoch + 1, "reward_mean": -3.0 + 0.25 * epoch, "reward_std": 0.5,
            "samples": 6, "approx_kl": None if epoch == 0 else 1e-3 * epoch, "actor": "local"}  # fmt: skip


def _batch(epoch: int) -> list[ScoredTrajectory]:
    """Six samples; sample i's final latent is filled with i (so the decode stand-in can tell which it got)."""
    row = _row(epoch)
    return [
        ScoredTrajectory(
            latents=torch.full((3, 4, 8, 8), float(i)),
            log_probs=torch.zeros(2),
            timesteps=torch.arange(2),
            prompt=PROMPTS[i],
            reward=row["reward_mean"] + 0.1 * i,
            policy_version=epoch,
            trajectory_id=f"t{epoch}-{i}",
        )  # fmt: skip
        for i in range(6)
    ]


def _eval(epoch: int) -> EvalResult:
    return EvalResult(
        epoch=epoch,
        prompts=["a fox", "a fox", "a cow", "a cow"],
        seeds=[5, 6, 5, 6],
        images=_images(4, 100),  # the same seeds every epoch
        scores={
            "jpeg_compressibility": [-2.0 - epoch, -2.5, -3.0, -3.5],
            "jpeg_incompressibility": [2.0, 2.5, 3.0, 3.5 + epoch],
        },
    )


@pytest.fixture
def stand_ins(monkeypatch):
    """The recorder's two model calls, recorded: held-out evaluation (epochs) and the VAE decode (which samples)."""
    calls = {"evaluate": [], "decode": []}

    def evaluate(pipe, cfg, score_fns, epoch):
        calls["evaluate"].append(epoch)
        assert list(score_fns) == ["jpeg_compressibility", "jpeg_incompressibility"]
        return _eval(epoch)

    def decode_latents(pipe, x0):
        calls["decode"].append([int(x[0, 0, 0]) for x in x0])
        rng = np.random.default_rng(len(calls["decode"]))
        return torch.from_numpy(rng.random((len(x0), 3, 64, 64), dtype=np.float32))

    monkeypatch.setattr("learner.recorder.evaluate", evaluate)
    monkeypatch.setattr("learner.recorder.decode_latents", decode_latents)
    return calls


def _run(tmp_path, cfg, epochs: int = 3, resume_epoch: int | None = None, rows=None):
    """`epochs` epochs through the recorder, as the epoch loop calls it (a record per epoch, close at the end)."""
    run = make_run_dir(
        cfg, str(tmp_path / "run")
    )  # config.yaml, images/, checkpoints/ as `ddpo train` makes them
    learner = types.SimpleNamespace(
        pipe=None, device=torch.device("cpu"), ema_weights=lambda: contextlib.nullcontext(False)
    )
    recorder = EpochRecorder(cfg, run, learner, {}, resume_epoch=resume_epoch)
    for epoch in range(resume_epoch or 0, epochs):
        recorder.record(rows[epoch] if rows else _row(epoch), _batch(epoch))
    recorder.close()
    return run


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_recorder_writes_each_row_with_its_evaluation_on_schedule(tiny_train_config, tmp_path, stand_ins):
    cfg = tiny_train_config(num_epochs=3, evaluation=EVAL, logging={"images_per_epoch": 4})
    run = _run(tmp_path, cfg)
    # evaluation every 2 epochs (after epoch 1) and after the last one (epoch 2); its metrics join that epoch's row
    assert stand_ins["evaluate"] == [1, 2]
    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert "eval/jpeg_compressibility_mean" not in rows[0]
    assert rows[1]["eval/jpeg_compressibility_mean"] == pytest.approx(-3.0)  # mean of [-3, -2.5, -3, -3.5]
    assert rows[2]["eval/jpeg_incompressibility_mean"] == pytest.approx(3.25)  # mean of [2, 2.5, 3, 5.5]
    # only the shown samples are decoded, from their final latents x_0, in batch order
    assert stand_ins["decode"] == [[0, 1, 2, 3]] * 3


def test_tensorboard_scalars_and_images_read_back(tiny_train_config, tmp_path, stand_ins):
    run = _run(tmp_path, tiny_train_config(num_epochs=3, evaluation=EVAL, logging={"images_per_epoch": 4}))
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    reward = acc.Scalars("reward_mean")
    assert [e.step for e in reward] == [0, 1, 2]
    assert [e.value for e in reward] == pytest.approx([-3.0, -2.75, -2.5])
    # None is skipped (no point at epoch 0), strings and the step itself are not scalars
    assert [(e.step, e.value) for e in acc.Scalars("approx_kl")] == [
        (1, pytest.approx(1e-3)),
        (2, pytest.approx(2e-3)),
    ]
    assert "actor" not in tags["scalars"] and "epoch" not in tags["scalars"]
    # eval: mean of [-2 - e, -2.5, -3, -3.5] = -2.75 - e / 4, logged once per evaluation
    ev = acc.Scalars("eval/jpeg_compressibility_mean")
    assert [(e.step, e.value) for e in ev] == [(1, pytest.approx(-3.0)), (2, pytest.approx(-3.25))]
    assert {"images/samples", "images/eval"} <= set(tags["images"])
    assert [e.step for e in acc.Images("images/samples")] == [0, 1, 2]


def test_a_resumed_run_replaces_the_tensorboard_points_after_its_checkpoint(
    tiny_train_config, tmp_path, stand_ins
):
    cfg = tiny_train_config(num_epochs=3)
    run = _run(tmp_path, cfg)  # epochs 0, 1, 2; say the checkpoint was after epoch 0
    # the loop drops metrics.jsonl's rows after the checkpoint before the resumed recorder starts (learner/loop.py)
    (run / "metrics.jsonl").write_text(json.dumps(_row(0)) + "\n")
    _run(tmp_path, cfg, epochs=2, resume_epoch=1, rows={1: {**_row(1), "reward_mean": 7.0}})
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(0, -3.0), (1, 7.0)]


def test_grids_and_reward_curve_are_valid_pngs(tiny_train_config, tmp_path, stand_ins):
    run = _run(tmp_path, tiny_train_config(num_epochs=3, evaluation=EVAL, logging={"images_per_epoch": 4}))
    for epoch in range(3):
        grid = Image.open(run / "images" / f"epoch_{epoch:04d}.png")
        grid.verify()
    grid = Image.open(run / "images" / "epoch_0002.png")
    # 4 of the 6 samples, 2 x 2, each 64 px image upscaled to a CELL_PX cell with a caption under it
    assert grid.format == "PNG" and grid.size[0] == 2 * (CELL_PX + 4) + 4 and grid.size[1] > 2 * CELL_PX
    cell = np.asarray(grid.convert("L"))[4 : 4 + CELL_PX, 4 : 4 + CELL_PX]
    assert cell.std() > 20  # the noise image, not a blank
    caption = np.asarray(grid.convert("L"))[4 + CELL_PX + 4 : 4 + CELL_PX + 30, 4 : 4 + CELL_PX]
    assert (caption < 80).sum() > 50  # dark text on white
    eval_grid = Image.open(run / "images" / "eval_epoch_0002.png")
    assert eval_grid.size[0] == 2 * (CELL_PX + 4) + 4  # columns = the 2 seeds per prompt
    assert json.loads((run / "eval" / "epoch_0002.json").read_text())["seeds"] == [5, 6, 5, 6]
    curve = Image.open(run / "reward_curve.png")
    curve.verify()
    # 2 panels (optimised reward, the watched one) of 5.5 x 4 inches at 100 dpi
    assert Image.open(run / "reward_curve.png").size == (1100, 400)


def test_no_grids_when_images_per_epoch_is_zero_and_no_tb_when_off(tiny_train_config, tmp_path, stand_ins):
    cfg = tiny_train_config(num_epochs=1, logging={"images_per_epoch": 0, "tensorboard": False})
    run = _run(tmp_path, cfg, epochs=1)
    assert not list((run / "images").glob("epoch_*.png")) and not (run / "tb").exists()
    assert stand_ins["decode"] == [] and stand_ins["evaluate"] == []  # nothing shown, evaluation off
    assert (run / "reward_curve.png").exists()


def test_wandb_is_optional_and_gets_the_same_scalars(
    tiny_train_config, tmp_path, monkeypatch, caplog, stand_ins
):
    calls = []
    fake_run = types.SimpleNamespace(
        log=lambda payload, step: calls.append(("log", step, payload)),
        finish=lambda: calls.append(("finish",)),
    )
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)) or fake_run,
        Image=lambda im: ("image", type(im).__name__),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_train_config(
        num_epochs=2, evaluation=EVAL, logging={"wandb_project": "ddpo-test", "tensorboard": False}
    )
    _run(tmp_path, cfg, epochs=2)
    assert calls[0][0] == "init" and calls[0][1]["project"] == "ddpo-test"
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [0, 1, 1]  # epoch 0, then eval and epoch 1
    assert (
        logs[0][2]["reward_mean"] == -3.0
        and "approx_kl" not in logs[0][2]
        and logs[0][2]["samples"] == 6
        and "images/samples" in logs[0][2]
    )
    assert calls[-1] == ("finish",)
    # not installed: a warning, and the run goes on
    monkeypatch.setitem(sys.modules, "wandb", None)
    _run(
        tmp_path / "second", tiny_train_config(num_epochs=1, logging={"wandb_project": "ddpo-test"}), epochs=1
    )
    assert "wandb is not installed" in caplog.text


def test_report_has_curve_grids_metrics_and_config(tiny_train_config, tmp_path, stand_ins):
    from services.app.cli import main

    cfg = tiny_train_config(
        run_name="report-test", num_epochs=3, evaluation=EVAL, logging={"images_per_epoch": 4}
    )
    run = _run(tmp_path, cfg)
    assert (run / "report.html").exists()  # written when the recorder closes
    (run / "report.html").unlink()
    main(["report", str(run)])  # the CLI path
    assert write_report(run) == run / "report.html"
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # the reward curve, embedded
    for name in ("images/epoch_0000.png", "images/epoch_0002.png", "images/eval_epoch_0001.png"):
        assert f'src="{name}"' in page
    assert page.index("eval_epoch_0001.png") < page.index("eval_epoch_0002.png")  # in epoch order
    assert "run_name: report-test" in page and "reward_mean" in page and "-2.75" in page
