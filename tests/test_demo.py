"""`python -m ficoco.demo` end to end on the tiny preset, and its one-line errors."""

from __future__ import annotations

from ficoco.demo import main


def test_demo_reports_reduced_tokens(preset_dirs, capsys):
    assert main(["--model", str(preset_dirs["tiny-llava-1.5"]), "--ratio", "0.25", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "vanilla:   576 visual tokens" in out
    assert "FiCoCo-VL:   288 visual tokens" in out  # sqrt(0.25) * 576 enter the LLM


def test_demo_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["--ratio", "2"]) == 2
    assert capsys.readouterr().err == "error: ratio must be in (0, 1], got ratio=2.0\n"
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "is neither a preset" in capsys.readouterr().err
