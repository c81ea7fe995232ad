"""The `w2w` command line: what `w2w profiles` prints, and how errors come back."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from w2wlib import list_profiles, load_profile
from w2wlib.cli import main


def test_profiles_lists_every_profile_with_its_description_and_settings(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    blocks: list[tuple[str, list[str]]] = []                          # (header, indented settings lines)
    for line in out.splitlines():
        if line.startswith("  "):
            blocks[-1][1].append(line)
        else:
            blocks.append((line, []))
    assert [header.split(":")[0] for header, _ in blocks] == list_profiles()
    for header, body in blocks:
        prof = load_profile(header.split(":")[0])
        assert header == f"{prof.name}: {prof.description}"
        assert yaml.safe_load(textwrap.dedent("\n".join(body))) == prof.settings   # the settings, as YAML


def test_an_error_is_one_line_on_stderr_and_status_1(capsys, tmp_path):
    assert main(["run", str(tmp_path / "missing.ipynb"), "--profile", "gpu9000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("w2w: error: ") and "unknown profile 'gpu9000'" in err


def test_an_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit, match="^2$"):                      # argparse's usage-error status
        main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
