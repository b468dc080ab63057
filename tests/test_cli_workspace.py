"""``fs3d ... --cublaslt-workspace-kib``: which cuBLASLt workspace the CLI asks for, and that it is set before the model
reaches a device (``fs3d_accel.cuda_settings`` holds the setting itself)."""
from __future__ import annotations

import pytest

from fs3d_accel import cli
from fs3d_accel import cuda_settings as cs

FASTEST = "compiled-zkv-fa4-all-sqfa2-ge-ac-pieces-m4-dt-nc-fk-cm-ok-mi"


class Stop(Exception):
    """Raised where the model would be built: the test has seen what it needs."""


@pytest.fixture
def at_build(env):
    """The cuBLASLt workspace in the environment when the CLI builds its pipeline (recorded, then Stop)."""
    seen = {}

    def fake_pretrained(*a, **k):
        seen["env"] = cs.cublaslt_workspace_kib()
        raise Stop

    env.setattr("fs3d_accel.pipeline.Pipeline.from_pretrained", staticmethod(fake_pretrained))
    return seen


@pytest.mark.parametrize("name", [FASTEST, "compiled-zkv-fa4-all-sqfa2-ge", "compiled-zkv-fa4-all-sqfa2-ge-ac"])
def test_auto_is_zero_for_gelu_epilogue_paths_on_cuda(env, name):
    assert cli.chosen_workspace_kib("auto", name, "cuda") == 0
    assert cli.chosen_workspace_kib("auto", name, "cuda:1") == 0


@pytest.mark.parametrize("name,device", [(FASTEST, "cpu"), ("bf16", "cuda"), ("compiled-zkv-fa4-all-sqfa2", "cuda"),
                                         ("off", "cuda"), ("off", "cpu")])
def test_auto_leaves_pytorchs_default_elsewhere(env, name, device):
    assert cli.chosen_workspace_kib("auto", name, device) is None


def test_an_exported_size_stands_under_auto(env):
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "1024")
    assert cli.chosen_workspace_kib("auto", FASTEST, "cuda") == 1024
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "-3")
    with pytest.raises(ValueError, match="must be >= 0 KiB"):
        cli.chosen_workspace_kib("auto", FASTEST, "cuda")


def test_a_number_is_taken_as_given(env):
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "1024")
    assert cli.chosen_workspace_kib(0, "bf16", "cpu") == 0
    assert cli.chosen_workspace_kib(4096, FASTEST, "cuda") == 4096


@pytest.mark.parametrize("raw,expected", [("auto", "auto"), ("0", 0), ("32768", 32768)])
def test_argument_values(raw, expected):
    assert cli.workspace_arg(raw) == expected


@pytest.mark.parametrize("raw,problem", [("-1", "must be >= 0 KiB"), ("1.5", "whole number"), ("AUTO", "whole number"),
                                         ("", "whole number")])
def test_bad_argument_values_are_refused(capsys, raw, problem):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["run", "--sample", "0", "--cublaslt-workspace-kib", raw])
    assert e.value.code == 2
    assert problem in capsys.readouterr().err


def test_the_parser_defaults_to_auto():
    assert cli.build_parser().parse_args(["run", "--sample", "0"]).cublaslt_workspace_kib == "auto"


def test_load_pipeline_sets_the_workspace_before_building_the_model(at_build):
    """A set size reaches the environment before the pipeline is built (here on the CPU, where CUDA never
    initialises): the setting PyTorch reads at its first cuBLASLt matmul."""
    args = cli.build_parser().parse_args(["run", "--sample", "0", "--cublaslt-workspace-kib", "0"])
    with pytest.raises(Stop):
        cli._load_pipeline(args)
    assert at_build["env"] == 0


def test_load_pipeline_leaves_the_default_for_auto_on_cpu(at_build):
    with pytest.raises(Stop):
        cli._load_pipeline(cli.build_parser().parse_args(["run", "--sample", "0"]))
    assert at_build["env"] is None


def test_a_size_that_can_no_longer_apply_is_refused(env):
    env.setattr(cs.torch.cuda, "is_initialized", lambda: True)
    args = cli.build_parser().parse_args(["run", "--sample", "0", "--cublaslt-workspace-kib", "0"])
    with pytest.raises(SystemExit, match="--cublaslt-workspace-kib: set the cuBLASLt workspace"):
        cli._load_pipeline(args)


def test_the_ray_factory_carries_the_setting_to_its_actors(at_build):
    """``CliPipeFactory`` (``--ray`` workers) applies the same setting in the actor's process before building."""
    from fs3d_analysis.distributed import CliPipeFactory
    args = cli.build_parser().parse_args(["eval", "--cublaslt-workspace-kib", "0"])
    factory = CliPipeFactory.from_args(args)
    assert factory.cublaslt_workspace_kib == 0
    assert CliPipeFactory.from_args(cli.build_parser().parse_args(["eval"])).cublaslt_workspace_kib == "auto"
    with pytest.raises(Stop):
        factory("cpu")
    assert at_build["env"] == 0


def test_the_workspace_is_set_before_the_device_checks(env):
    """``RunOptions.check_device`` may initialise CUDA (it reads the device's capability), so the workspace must be in
    the environment before it runs (found on an H100: set after it, auto was refused)."""
    from fs3d_accel.stages.options import RunOptions
    seen = {}

    def check_device(self, device):
        seen["env"] = cs.cublaslt_workspace_kib()
        raise Stop

    env.setattr(RunOptions, "check_device", check_device)
    with pytest.raises(Stop):
        cli._load_pipeline(cli.build_parser().parse_args(["run", "--sample", "0", "--cublaslt-workspace-kib", "0"]))
    assert seen["env"] == 0


def test_auto_warns_and_goes_on_where_it_can_no_longer_apply(env):
    env.setattr(cs.torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(RuntimeWarning, match="auto: not applied"):
        assert cli.apply_workspace_setting("auto", FASTEST, "cuda") is None
    assert cs.cublaslt_workspace_kib() is None
    with pytest.raises(SystemExit, match="--cublaslt-workspace-kib: set the cuBLASLt workspace"):
        cli.apply_workspace_setting(0, FASTEST, "cuda")
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "0")  # already what auto asks for: nothing to change, no warning
    assert cli.apply_workspace_setting("auto", FASTEST, "cuda") == 0


def test_an_unreadable_exported_size_is_refused_by_name(env):
    env.setenv(cs.CUBLASLT_WORKSPACE_ENV, "lots")
    with pytest.raises(SystemExit, match="--cublaslt-workspace-kib: CUBLASLT_WORKSPACE_SIZE='lots' is not a whole"):
        cli.apply_workspace_setting("auto", FASTEST, "cuda")


def test_auto_follows_the_gelu_epilogue_option_of_every_named_path(env):
    from fs3d_accel.stages.options import FAST_PATHS
    for name, options in FAST_PATHS.items():
        assert cli.chosen_workspace_kib("auto", name, "cuda") == (0 if options.gelu_epilogue else None), name
    assert sum(o.gelu_epilogue for o in FAST_PATHS.values()) >= 7  # the -ge paths
    assert cli.chosen_workspace_kib("auto", "no-such-path-ge", "cuda") is None  # refused later by --fast-path
