"""utils/errors.py: library errors say what is wrong in their own terms and name the
setting; the command line's one line puts the flag in front."""
from __future__ import annotations

import pickle

import pytest

from envs import registry, smax
from utils.errors import ConfigError


def test_the_flag_goes_in_front_of_the_librarys_message():
    plain = ConfigError("no run directory here")
    assert str(plain) == plain.message == "no run directory here" and plain.field is None
    named = ConfigError("HalfCheetah has no partition '3x3' (known: 2x3, 6x1)", field="agent_conf")
    assert named.message == "HalfCheetah has no partition '3x3' (known: 2x3, 6x1)"
    assert str(named) == "--agent_conf: HalfCheetah has no partition '3x3' (known: 2x3, 6x1)"
    valued = ConfigError("CUDA is not available on this machine (use cpu or auto)", field="device", value="cuda:1")
    assert str(valued) == "--device cuda:1: CUDA is not available on this machine (use cpu or auto)"


def test_the_setting_survives_pickling():
    """Env worker processes and Ray tasks hand errors across processes."""
    copy = pickle.loads(pickle.dumps(ConfigError("unknown SMAX map 'x'", field="map_name", value="x")))
    assert (copy.message, copy.field, copy.value) == ("unknown SMAX map 'x'", "map_name", "x")
    assert str(copy) == "--map_name x: unknown SMAX map 'x'"


def test_env_families_word_their_errors_without_flags():
    with pytest.raises(ConfigError) as unknown_map:
        smax.check_task({"map_name": "4m"})
    assert unknown_map.value.field == "map_name" and "--" not in unknown_map.value.message
    assert unknown_map.value.message.startswith("unknown SMAX map '4m' (known: 3m, ")
    with pytest.raises(ConfigError) as unknown_family:
        registry.family("smaxx")
    assert unknown_family.value.field == "env"
    assert unknown_family.value.message == ("unknown environment family 'smaxx' (known: mamujoco, smax, smac) "
                                            "(did you mean smax?)")


def test_mamujoco_names_the_body_and_its_partitions():
    pytest.importorskip("gymnasium_robotics")
    from envs import mamujoco

    with pytest.raises(ConfigError) as partition:
        mamujoco.check_task({"scenario": "HalfCheetah", "agent_conf": "3x3"})
    assert partition.value.message == "HalfCheetah has no partition '3x3' (known: 2x3, 6x1)"
    assert str(partition.value) == "--agent_conf: " + partition.value.message
    with pytest.raises(ConfigError) as body:
        mamujoco.check_task({"scenario": "Cheetah", "agent_conf": "2x3"})
    assert body.value.field == "scenario" and body.value.message.startswith("unknown MaMuJoCo scenario 'Cheetah'")


@pytest.mark.parametrize("module, argv, expected", [
    ("benchmark", ["configs/benchmarks/mamujoco-10m.yaml", "--status", "--report"],
     "benchmark: error: argument --report: not allowed with argument --status"),
    ("benchmark", ["configs/benchmarks/mamujoco-10m.yaml", "--max_parallel", "two"],
     "benchmark: error: argument --max_parallel/--max-parallel: invalid int value: 'two'"),
    ("benchmark", [], "benchmark: error: the following arguments are required: suite"),
    ("plot", ["results", "--points", "many"], "plot: error: argument --points: invalid int value: 'many'"),
])
def test_bad_flags_of_the_result_tools_are_one_line(module, argv, expected, capsys):
    import importlib

    tool = importlib.import_module(f"train.{module}")
    assert tool.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == expected and captured.out == ""
