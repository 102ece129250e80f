"""The `ddpo` command as a user runs it: `ddpo tiny-models` as a subprocess (the session's tiny models), bad input
through the entry point (`services.app.cli:main`, what the `ddpo` script calls)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_tiny_models_writes_a_loadable_pipeline(tiny_models_run):
    """The session's tiny models are `ddpo tiny-models` run as a subprocess (conftest.py): what it printed and
    wrote."""
    # what it prints is a line per model written: no notices about components the tiny SD3 lacks by design, or
    # about the PIL image processors this project means to use
    out = tiny_models_run.output
    assert "cannot be saved" not in out and "requires torchvision" not in out, out
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models_run.path / "sd")
    assert pipe.unet.config.sample_size == 8 and pipe.tokenizer.model_max_length == 77


def test_serve_loads_the_reward_server_only():
    """`ddpo serve KIND` (what every reward-server container runs) imports neither the trainer nor diffusers: the
    entry point dispatches before loading them (a reward server started in ~10 s before, ~3 s now)."""
    probe = (
        "import sys\n"
        "from services.app.cli import main\n"
        "try:\n    main(['serve', 'jpeg', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('diffusers', 'ray', 'learner.learner', 'actors.sampler', 'services.app.driver',"
        " 'reward_servers.serve') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['reward_servers.serve']", out.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--set", "sampling.eat=1"], "sampling.eat: unknown key"),
        (
            ["train", "--config", "quickstart-alignment", "--set", "cluster.in_process=true"],
            "cluster.in_process",
        ),
        (["train", "--set", "prompts.set=from_file"], "prompts.path: required"),
        (
            ["train", "--set", "prompts.set=from_file", "--set", "prompts.path=/nonexistent.txt"],
            "/nonexistent.txt",
        ),
        (["train", "--set", "prompts.set=list", "--set", "prompts.items=[]"], "prompts.items"),
        (["report", "{tmp}/no-such-run"], "no-such-run"),
        (["sample", "--model", "{tiny_sd}", "--lora", "{tmp}/no-lora", "--prompt", "a cat"], "no-lora"),
    ],
)
def test_bad_input_is_one_line_naming_it_exit_2_and_nothing_created(
    args, named, tmp_path, tiny_sd_path, capsys
):
    """What a new user gets wrong is refused before anything starts: no run directory, no output, no traceback."""
    from services.app.cli import main

    args = [a.format(tmp=tmp_path, tiny_sd=tiny_sd_path) for a in args]
    out = tmp_path / "out"
    args += (
        ["--out", str(out)] if args[0] == "sample" else ["--run-dir", str(out)] if args[0] == "train" else []
    )
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"ddpo {args[0]}: ") and named in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
