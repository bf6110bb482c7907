"""The console script: a fast top-level help, and mistakes reported in a few lines naming key and file."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import lightning_ebm.cli  # noqa: F401  (Lightning's log handler binds stderr now, not a test's capture)
from lightning_ebm import console
from lightning_ebm.console import SUBCOMMANDS, simplify_parser_message

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy2d.yaml")


def test_top_level_help_lists_every_subcommand_without_importing_torch_or_lightning():
    code = ("import sys; from lightning_ebm.console import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'lightning', 'jsonargparse') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("fit", "validate", "test", "predict", "sample"):
        assert f"\n  {name} " in result.stdout
    assert set(SUBCOMMANDS) >= {"fit", "validate", "test", "predict", "sample"}


def test_import_lightning_ebm_is_lazy_and_its_names_still_resolve():
    code = ("import sys, lightning_ebm; assert 'torch' not in sys.modules; "
            "from lightning_ebm import EBM, samplers; assert samplers.GradientDescent and EBM.__name__ == 'EBM'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_version_and_no_arguments(capsys):
    console.main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-ebm ")
    with pytest.raises(SystemExit) as info:
        console.main([])
    assert info.value.code == 2 and "subcommands:" in capsys.readouterr().out


def run_console(capsys, *argv: str) -> str:
    """Run the console script in-process; return its stderr (it must exit with status 2)."""
    with pytest.raises(SystemExit) as info:
        console.main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 2 <= len(err.strip().splitlines()) <= 4, err  # the message, where it was set, the tip
    assert "Traceback" not in err and "Union subtypes" not in err and "Given value" not in err
    return err


def test_a_bad_value_names_the_key_and_the_command_line(capsys):
    err = run_console(capsys, "fit", "--config", TOY, "--model.init_args.sampler.init_args.step_size=-0.1")
    assert "model.init_args.sampler: GradientDescent: step_size must be a positive finite number, got -0.1" in err
    assert "(set on the command line)" in err


def test_a_misspelled_dataset_names_the_choices_and_the_config_file(capsys):
    err = run_console(capsys, "fit", "--config", TOY, "--data.init_args.name=8gausians")
    assert ("data: Toy2DDataModule: name (the toy dataset) must be one of '2spirals', '8gaussians'" in err
            and "got '8gausians' (did you mean '8gaussians'?)" in err)


def test_a_class_path_typo_suggests_the_right_name_and_names_the_file(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(TOY).read_text().replace("samplers.GradientDescent", "samplers.GradientDescnt"))
    err = run_console(capsys, "fit", "--config", str(config))
    assert "model.init_args.sampler: module 'lightning_ebm.samplers' has no attribute 'GradientDescnt'" in err
    assert "(did you mean 'GradientDescent'?)" in err and f"(in {config})" in err


def test_a_yaml_syntax_error_names_the_file_line_and_column(capsys, tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  class_path: lightning_ebm.EBM\n   init_args: [\n")
    err = run_console(capsys, "fit", "--config", str(config))
    assert f"--config {config}, line 3, column 13: YAML syntax error" in err


def test_a_missing_config_or_checkpoint_is_named(capsys, tmp_path):
    err = run_console(capsys, "fit", "--config", str(tmp_path / "nope.yaml"))
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in err
    err = run_console(capsys, "fit", "--config", TOY, "--ckpt_path", str(tmp_path / "missing.ckpt"))
    assert f"--ckpt_path {tmp_path / 'missing.ckpt'}: no such file" in err


def test_a_ckpt_path_keyword_that_names_no_checkpoint_is_an_error(capsys, tmp_path):
    """``best`` is unknown to a new process, and ``last`` without checkpoints would run an untrained model."""
    err = run_console(capsys, "validate", "--config", TOY, "--ckpt_path", "best")
    assert "validate: error: --ckpt_path best: Lightning knows the best checkpoint only in the process" in err
    err = run_console(capsys, "test", "--config", TOY, "--ckpt_path", "last",
                      f"--trainer.logger.init_args.save_dir={tmp_path}")
    assert f"test: error: --ckpt_path last: no checkpoint under {tmp_path / 'toy2d'}/*/" in err


def test_the_source_named_is_a_config_file_that_sets_the_key(tmp_path):
    """Not every --config file, and none for a message that does not start with a config key."""
    from lightning_ebm.cli import _with_source

    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_steps: abc\n")
    argv = ["fit", "--config", TOY, "--config", str(extra), "--trainer.accelerator=gpu"]
    assert _with_source("model.init_args.sampler: bad", argv).endswith(f"(in {TOY})")
    assert _with_source("trainer.callbacks[1]: bad", argv).endswith(f"(in {TOY})")
    assert _with_source("trainer.max_steps: bad", argv).endswith(f"(in {TOY}, {extra})")
    assert _with_source("MisconfigurationException: No supported gpu backend found!", argv) == (
        "MisconfigurationException: No supported gpu backend found!")


def test_an_unknown_option_or_subcommand_gets_a_suggestion(capsys):
    err = run_console(capsys, "fit", "--config", TOY, "--trainer.max_stepz=3")
    assert "unrecognized arguments: --trainer.max_stepz=3 (did you mean '--trainer.max_steps'?)" in err
    err = run_console(capsys, "fitt")
    assert "unknown subcommand 'fitt' (did you mean 'fit'?)" in err


def test_a_mistake_found_once_the_run_started_is_short_too(capsys, tmp_path):
    """The library's own checks in setup (here: the latent does not fit the data) print their message."""
    err = run_console(capsys, "fit", "--config", TOY, "--model.init_args.latent.init_args.shape=[3]",
                      f"--trainer.logger.init_args.save_dir={tmp_path}")
    assert "fit: error: latent shape (3,) does not match the data's sample shape (2,)" in err
    with pytest.raises(ValueError, match=r"latent shape \(3,\)"):  # --debug: the exception itself
        console.main(["fit", "--config", TOY, "--model.init_args.latent.init_args.shape=[3]", "--debug",
                      f"--trainer.logger.init_args.save_dir={tmp_path}"])


def test_a_dataset_not_in_place_is_a_short_error(capsys, tmp_path):
    err = run_console(capsys, "fit", "--config", TOY, "--data=lightning_ebm.data.VisionDataModule",
                      "--data.init_args.name=mnist", f"--data.init_args.root={tmp_path / 'nowhere'}",
                      "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}")
    assert f"fit: error: mnist not found (or corrupted) under root='{tmp_path / 'nowhere'}'" in err


def test_an_optimizer_argument_torch_rejects_is_a_short_error(capsys, tmp_path):
    err = run_console(capsys, "fit", "--config", TOY, "--model.init_args.optimizer.init_args.lr=-1",
                      "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}")
    assert "fit: error: EBM: optimizer: Invalid learning rate: -1.0" in err


@pytest.mark.parametrize("device", ["gpu", "cuda:0"])
def test_sample_on_a_device_this_machine_lacks_is_a_short_error(capsys, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ckpt = tmp_path / "last.ckpt"
    ckpt.touch()  # checked before the checkpoint is read
    with pytest.raises(SystemExit) as info:
        console.main(["sample", "--ckpt_path", str(ckpt), "--device", device, "--output", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"sample: error: --device {device!r} cannot be used here" in err
    assert "Traceback" not in err


def test_only_the_librarys_own_raise_statements_lose_their_traceback():
    from lightning_ebm.latents import Uniform
    from lightning_ebm.samplers import GradientDescent

    def caught(action) -> BaseException:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
            return err
        raise AssertionError("nothing raised")

    assert console._worded_for_the_user(caught(lambda: Uniform((2,), low=1.0, high=0.0)))
    assert not console._worded_for_the_user(caught(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3)))  # torch's
    assert not console._worded_for_the_user(caught(lambda: Uniform((2,)).sample("3", wrong=1)))  # Python's
    # an error surfacing inside the library at a line that is not a raise (a torch op failing there)
    frames = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            frame = sys._getframe(1)
            while "lightning_ebm" not in Path(frame.f_code.co_filename).parts:
                frame = frame.f_back
            frames.append(frame)
            return x.pow(2).sum(1)

    GradientDescent(steps=1, step_size=0.1)(Spy(), torch.zeros(2, 2))
    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    frame = frames[0]
    err.__traceback__ = types.TracebackType(None, frame, frame.f_lasti, frame.f_lineno)
    assert not console._worded_for_the_user(err)


def test_debug_shows_the_real_exception(tmp_path):
    with pytest.raises(ValueError, match="step_size must be a positive finite number"):
        console.main(["fit", "--config", TOY, "--model.init_args.sampler.init_args.step_size=-0.1", "--debug"])


def test_simplify_parser_message_keeps_the_innermost_error_and_joins_the_keys():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning_ebm.module.EBM'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightning_ebm.EBM':
        Parser key "sampler":
          Problem with given class_path 'lightning_ebm.samplers.GradientDescnt':
            module 'lightning_ebm.samplers' has no attribute 'GradientDescnt'
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'class_path': 'lightning_ebm.EBM'}"""
    assert simplify_parser_message(message) == (
        "model.init_args.sampler: module 'lightning_ebm.samplers' has no attribute 'GradientDescnt'")


def test_model_help_lists_the_library_first_and_counts_torch(capsys):
    with pytest.raises(SystemExit):
        console.main(["fit", "--model.help", "lightning_ebm.EBM"])
    out = " ".join(capsys.readouterr().out.split())
    assert "lightning_ebm.energies.MLPEnergy" in out and "from torch and other libraries" in out
    assert "torch.nn.Linear" not in out and "torch.ao.nn" not in out
