"""imagebatch/commands.py: the `imagebatch` console command."""

import os
import subprocess
import sys

import pytest

from imagebatch import cli
from imagebatch import commands

SCRIPT = os.path.join(os.path.dirname(sys.executable), "imagebatch")


def test_every_program_has_a_summary_and_a_main():
  assert set(commands.SUMMARIES) == set(cli.PROGRAMS)
  for name in cli.PROGRAMS:
    assert callable(getattr(__import__(cli.PROGRAMS[name], fromlist=["main"]),
                            "main"))


def test_unknown_command_is_one_line_with_the_nearest(capsys):
  assert commands.main(["predit"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "did you mean predict?" in err
  assert commands.main([]) == 2
  assert commands.main(["--help"]) == 0
  assert "make_shards" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SCRIPT),
                    reason="the console script is installed by pip install")
def test_works_from_a_folder_holding_a_users_model_py_and_tools(tmp_path):
  """`python -m model.adopt` imports the user's model.py from the current
  folder; the console command does not."""
  (tmp_path / "model.py").write_text("raise SystemExit('the user model.py')\n")
  (tmp_path / "tools").mkdir()
  (tmp_path / "tools" / "__init__.py").write_text("")
  shadowed = subprocess.run([sys.executable, "-m", "model.adopt", "--help"],
                            cwd=tmp_path, capture_output=True, text=True,
                            check=False)
  assert "the user model.py" in shadowed.stderr
  for name in ("adopt", "query", "predict"):
    result = subprocess.run([SCRIPT, name, "--help"], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
