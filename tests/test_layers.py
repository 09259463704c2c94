"""The --layers grammar and `fusefeat layers`."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from fusefeat.errors import UsageError
from fusefeat.layers import parse_layers

BLOCKS = list(range(1, 13))


@pytest.mark.parametrize("spec, expected", [
    (None, (5, 12)), ("", (5, 12)), ("6,12", (6, 12)), ("12,6,6", (6, 12)), ("-1", (12,)),
    ("-2,-1", (11, 12)), ("3..5", (3, 4, 5)), ("10..-1", (10, 11, 12)), ("all", tuple(BLOCKS)),
    (" 1 , 2 ", (1, 2)), ([4, 2], (2, 4)),
])
def test_grammar(spec, expected):
    assert parse_layers(spec, BLOCKS, (5, 12), "ast") == expected


@pytest.mark.parametrize("spec, fragment", [
    ("13", "has no layer 13"), ("0", "has no layer 0"), ("-13", "counts back past"),
    ("x", "not a layer number"), ("5..3", "empty"), ("1,,2", "not a layer number"),
    ("1.5", "not a layer number"),
])
def test_grammar_errors(spec, fragment):
    with pytest.raises(UsageError) as info:
        parse_layers(spec, BLOCKS, (5, 12), "ast")
    assert fragment in str(info.value)
    assert "1..12" in str(info.value)


def test_zero_allowed_where_offered():
    assert parse_layers("0,-1", [0, 1, 2, 3], (3,), "hf") == (0, 3)
    assert parse_layers("-1", [0, 1, 2, 3], (3,), "hf") == (3,)


def test_layers_command():
    table = json.loads(run_cli("layers", "--model", "vggish", "--json", check=0).stdout)
    assert table["default"] == [10, 15]
    by_number = {row["number"]: row for row in table["layers"]}
    assert by_number[10]["module"] == "features.9" and by_number[10]["frame_dim"] == 4096
    assert by_number[15]["shape_1s"] == [512, 12, 8] and by_number[22]["frame_dim"] == 128
    text = run_cli("layers", "--model", "cnn14", check=0).stdout
    assert "conv_block3" in text and "<- default" in text and "6144-d" in text
    assert "1536-d" in run_cli("layers", "-m", "ast", check=0).stdout


def test_bad_layers_on_the_cli_is_a_usage_error(tmp_path, wav_dir):
    result = run_cli("extract", wav_dir, "--model", "cnn14", "--layers", "7", "-o", tmp_path / "o")
    assert result.returncode == 2
    assert "cnn14 has no layer 7" in result.stderr and "Traceback" not in result.stderr
    unknown = run_cli("extract", wav_dir, "--model", "resnet", "-o", tmp_path / "o")
    assert unknown.returncode == 2 and "unknown model 'resnet'" in unknown.stderr
