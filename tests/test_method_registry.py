"""Methods declare their parameters; the CLI flags, the option checks and the sweep grid come from them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lssf_lightning.commands import build_parser
from lssf_lightning.methods.registry import METHODS, check_options, register_method
from lssf_lightning.methods.resta import Resta
from lssf_lightning.methods.spec import Param
from lssf_lightning.realign import realign_checkpoint
from lssf_lightning.sweep import SweepGrid, grid_candidates
from lssf_lightning.validation import SettingError

REQUIRED = ["realign", "--finetuned", "f", "--output", "o"]


def test_a_parameter_the_method_does_not_take_is_refused_naming_its_parameters(llama_trio, tmp_path):
    with pytest.raises(SettingError, match=r"^method 'lssf' takes alpha; beta belongs to resta$"):
        check_options("lssf", {"beta": 2.0})
    with pytest.raises(SettingError, match=r"method 'resta' takes beta, drop_rate, seed; add belongs to "
                                           r"lssf-reset, lssf-erosion, lssf-two-sided"):
        check_options("resta", {"add": 0.1})
    with pytest.raises(SettingError, match="method 'lssf' takes alpha; beta belongs to resta"):
        realign_checkpoint(llama_trio.finetuned, tmp_path / "out", aligned=llama_trio.aligned,
                           unaligned=llama_trio.base, method="lssf", beta=2.0, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before any work
    assert check_options("lssf-two-sided", {"input_share": 0.5}) == {"alpha": 1.0, "input_share": 0.5,
                                                                     "add": 0.0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": -1.0}, r"alpha must be in \[0, 100\]"),
        ({"alpha": 1e30}, r"alpha must be in \[0, 100\]"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"input_share": 1.5}, r"input_share must be in \[0, 1\]"),
        ({"input_share": -0.1}, r"input_share must be in \[0, 1\]"),
    ],
)
def test_ranges_are_refused_in_one_line(options, message):
    with pytest.raises(SettingError, match=message) as caught:
        check_options("lssf-two-sided", options)
    assert "\n" not in str(caught.value)


def test_cli_refuses_a_foreign_parameter_and_out_of_range_values_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "lssf_lightning.cli", *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=300)

    done = run("realign", "--finetuned", "f", "--output", "o", "--method", "lssf", "--beta", "2")
    assert done.returncode == 1 and done.stdout == ""
    expected = "lssf-lightning realign: error: method 'lssf' takes --alpha; --beta belongs to resta\n"
    assert done.stderr == expected
    for flag, value in (("--alpha", "-1"), ("--alpha", "1e30"), ("--input-share", "1.5")):
        done = run("realign", "--finetuned", "f", "--output", "o", flag, value)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert f"{flag} must be in" in done.stderr
    assert not (tmp_path / "o").exists()


def test_a_toy_method_appears_in_the_cli_flags_and_the_sweep_grid_without_other_edits(llama_trio):
    gain = Param("gain", float, 1.0, "the toy's scale", low=0.0, high=10.0)

    class Scale:  # scales every targeted weight by `gain`
        def __init__(self, inputs):
            self.gain, self.inner = inputs.options["gain"], Resta(inputs.aligned, inputs.unaligned)

        def plan(self, target):
            return {key: (lambda w, g=self.gain: w * g) for key in self.inner.plan(target)}

        def summary(self):
            return {"gain": self.gain}

    register_method("toy-scale", (gain,), grid=((0.5,), (2.0,)), help="scale the weights")(Scale)
    try:
        parser = build_parser()
        args = parser.parse_args([*REQUIRED, "--method", "toy-scale", "--gain", "3"])
        assert (args.method, args.gain) == ("toy-scale", 3.0)
        with pytest.raises(SystemExit):
            parser.parse_args([*REQUIRED, "--method", "toy-scale", "--gain", "11"])
        with pytest.raises(SettingError, match="method 'toy-scale' takes gain; alpha belongs to lssf"):
            check_options("toy-scale", {"alpha": 1.0})
        sweep = parser.parse_args(["sweep", "--finetuned", "f", "--aligned", "a", "--unaligned", "u",
                                   "--output", "o", "--toy-scale", "0.25,4"])
        assert sweep.grid_toy_scale == ((0.25,), (4.0,))
        assert SweepGrid().size() == sum(len(s.grid) for s in METHODS.values() if not s.lora_only)
        grid = SweepGrid(points={"toy-scale": METHODS["toy-scale"].grid})
        candidates = list(grid_candidates(grid, str(llama_trio.aligned), str(llama_trio.base)))
        assert [(c.method, dict(c.params)) for c in candidates] == [("toy-scale", {"gain": 0.5}),
                                                                    ("toy-scale", {"gain": 2.0})]
        assert candidates[1].planner().gain == 2.0
    finally:
        METHODS.pop("toy-scale")
    assert "--gain" not in build_parser().format_help()


def test_sweep_grid_defaults_are_the_declared_points_in_registry_order():
    grid = SweepGrid(subspaces=())
    methods = grid.methods(lora=True)
    assert list(methods) == list(METHODS)
    assert methods["lssf-reset"][1] == [{"alpha": 1.0, "add": 0.0}, {"alpha": 1.0, "add": 0.15},
                                        {"alpha": 2.0, "add": 0.0}]
    assert "safelora" not in grid.methods(lora=False)
    with pytest.raises(SettingError, match="drop_rate must be in"):
        SweepGrid(points={"resta": ((1.0, 1.0),)}).methods()
    with pytest.raises(ValueError, match="unknown methods"):
        SweepGrid(points={"bogus": ((1.0,),)}).methods()
