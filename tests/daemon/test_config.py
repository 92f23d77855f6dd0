from __future__ import annotations

from pathlib import Path

import pytest

from livedecon.calibration._config import MicroscopeConfig, default_microscope, load_microscope
from livedecon.daemon._daemon_config import DaemonConfig, load_daemon_config
from livedecon.engines._configfile import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "name", ["microscope_sim.toml", "microscope_tirf_149.toml", "microscope_widefield_3d.toml"]
)
def test_example_microscopes_load(name):
    scope = load_microscope(CONFIGS / name)
    assert scope.optics.na < scope.optics.immersion_ri


def test_example_setups_say_what_they_are():
    tirf = load_microscope(CONFIGS / "microscope_tirf_149.toml")
    assert (tirf.optics.modality, tirf.optics.na) == ("tirf", 1.49)
    wf3d = load_microscope(CONFIGS / "microscope_widefield_3d.toml")
    assert wf3d.optics.modality == "widefield"
    assert wf3d.sample.depth_um > 0


def test_default_microscope_is_the_simulated_one():
    scope = default_microscope()
    assert scope.sample is not None
    assert scope.sample.depth_um == 0


def test_daemon_example_binds_loopback():
    config = load_daemon_config(CONFIGS / "daemon.toml")
    assert config.endpoints.remote_hosts() == []
    assert config.spill_path == Path("livedecon_out") / "spill"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_out_of_range_field_names_file_and_field(tmp_path):
    path = _write(tmp_path, "[optics]\nna = 2.5\n")
    with pytest.raises(ConfigError) as info:
        load_microscope(path)
    message = str(info.value)
    assert str(path) in message
    assert "optics.na" in message
    assert "2.5" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[camera]\ngain = 2.0\n", r"camera\.gain: Extra inputs are not permitted"),
        ('[camera]\nbit_depth = "sixteen"\n', r"camera\.bit_depth"),
        ("[optics]\nna = 1.45\nimmersion_ri = 1.33\n", "must be below immersion_ri"),
        ('[optics]\nmodality = "confocal"\n', "needs excitation_um"),
        ("[camera]\noffset_adu = 300\nbit_depth = 8\n", "below the 8-bit maximum"),
        ("[optics\nna = 1.4\n", r"not valid TOML.*line 1"),
    ],
    ids=["unknown-key", "wrong-type", "na-vs-immersion", "confocal", "offset", "syntax"],
)
def test_bad_microscope_config_is_one_message_naming_the_file(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_microscope(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_microscope(tmp_path / "nope.toml")


def test_remote_binding_is_opt_in(tmp_path):
    path = _write(tmp_path, '[endpoints]\ningest = "tcp://0.0.0.0:5555"\n')
    with pytest.raises(ConfigError, match=r"endpoints: .*allow_remote"):
        load_daemon_config(path)
    with pytest.raises(ConfigError, match="curve_keys_dir"):
        load_daemon_config(_write(tmp_path, "[endpoints]\nallow_remote = true\n"))
    with pytest.raises(ConfigError, match="needs a port"):
        load_daemon_config(_write(tmp_path, '[endpoints]\ningest = "tcp://127.0.0.1"\n'))


def test_defaults_round_trip():
    scope = default_microscope()
    assert MicroscopeConfig.model_validate(scope.model_dump()) == scope
    assert DaemonConfig().endpoints.ingest.startswith("tcp://127.0.0.1:")
