"""The configuration: CLI flags, dataclass and .env.example stay in sync; precedence."""

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from lnsp.cli import main
from lnsp.config import ConfigError, TrainConfig, env_example, env_name, resolve
from lnsp.guard.threads import read_env_file

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_env_example_lists_every_field_with_its_default():
    assert (ROOT / ".env.example").read_text() == env_example(), \
        "regenerate: python -m lnsp.config > .env.example"
    example = read_env_file(ROOT / ".env.example")
    assert sorted(example) == sorted(env_name(f) for f in FIELDS)
    for f in dataclasses.fields(TrainConfig):
        value = example[env_name(f.name)]
        if isinstance(f.default, bool):
            assert value == str(f.default).lower()
        else:
            assert type(f.default)(value) == f.default, f.name


@pytest.mark.parametrize("command", ["train", "launch"])
def test_every_field_has_a_flag(command):
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0, r.output
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in r.output, name


def test_precedence_cli_over_env_over_dotenv_over_default(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LNSP_EPOCHS=7\nLNSP_LR=0.5  # comment\nLNSP_K=9\n")
    env = {"LNSP_LR": "0.25", "LNSP_K": "11"}
    c = resolve({"k": 13}, environ=env, dotenv_path=dotenv)
    assert (c.k, c.lr, c.epochs, c.batch_size) == (13, 0.25, 7, TrainConfig.batch_size)
    assert c.run_dir.startswith("runs/")


def test_validation_names_every_bad_field():
    with pytest.raises(ConfigError) as e:
        resolve({"epochs": 0, "temperature": -1.0, "index": "hnsw", "threads": "many"},
                environ={}, dotenv_path="/nonexistent")
    message = str(e.value)
    for name in ("epochs", "temperature", "index", "threads"):
        assert name in message


def test_bad_environment_value_is_one_line_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(tmp_path)],
                           env={"LNSP_EPOCHS": "many"})
    assert r.exit_code == 2, r.output
    assert "LNSP_EPOCHS" in r.output and "Traceback" not in r.output


def test_to_argv_round_trips(tmp_path, monkeypatch):
    from lnsp.cli import config_from, train

    monkeypatch.chdir(tmp_path)  # no .env of the checkout's
    c = TrainConfig(epochs=5, resume=True, run_dir="runs/x", lr=0.0007, index="ivf-sq8",
                    threads="3", stall_timeout=2.5, on_stall="exit", max_restarts=2)
    ctx = train.make_context("train", c.to_argv())  # parsed back by the real command
    assert config_from(ctx.params) == c
    assert config_from(train.make_context("train", c.replace(resume=False).to_argv())
                       .params).resume is False
