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


def test_subcommands_not_built_yet_say_so_and_fail(capsys):
    pending = [name for name, module in COMMANDS.items() if load_command(module) is None]
    for name in pending:
        assert main([name]) == 2
        assert capsys.readouterr().err.strip() == f"layerskip {name}: not built yet"


def test_python_dash_m_works():
    result = subprocess.run([sys.executable, "-m", "layerskip", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "export-hf" in result.stdout
