from __future__ import annotations

import subprocess
import sys

import pytest

from layerskip.cli import COMMANDS, load_command, main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert f"usage: layerskip {name}" in capsys.readouterr().out


def test_a_subcommand_whose_module_is_missing_says_not_built_and_fails(monkeypatch, capsys):
    from layerskip import cli

    monkeypatch.setitem(cli.COMMANDS, "future", "no_such_module")
    monkeypatch.setitem(cli.ONE_LINE_HELP, "future", "a command still to come")
    assert main(["future"]) == 2
    assert capsys.readouterr().err.strip() == "layerskip future: not built yet"


def test_every_listed_subcommand_is_built():
    assert all(load_command(module) is not None for module in COMMANDS.values())


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "layerskip", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export-hf" in result.stdout
