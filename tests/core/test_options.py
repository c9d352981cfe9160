"""Option checks: one set of validators, one message form ("NAME must be ..., got VALUE"), checks run when
an option dataclass is made (frozen ones too), and unknown keys named by build_config."""

from __future__ import annotations

import dataclasses
import math

import pytest
import transformers

from svdkit import SvdkitError
from svdkit.core.options import (
    Options,
    UserOptions,
    boolean,
    build_config,
    check_context,
    choice,
    context_length,
    integer,
    mapping,
    number,
    option,
    parse_assignment,
    path,
    string,
    strings,
)


@pytest.mark.parametrize(
    "check, value, message",
    [
        (number(0, 2), 3, r"x must be a number in \[0, 2\], got 3"),
        (number(0, 1, lo_open=True), 0, r"x must be a number in \(0, 1\], got 0"),
        (number(0, 1, hi_open=True), "a", r"x must be a number in \[0, 1\), got 'a'"),
        (number(0, lo_open=True), -1, "x must be positive, got -1"),
        (number(0, lo_open=True), "a", "x must be a positive number, got 'a'"),
        (number(), math.nan, "x must be a number, got nan"),
        (number(), True, "x must be a number, got True"),
        (integer(1), 0, "x must be a positive integer, got 0"),
        (integer(2), 1, "x must be an integer >= 2, got 1"),
        (integer(), 1.0, "x must be an integer, got 1.0"),
        (choice("a", "b"), "c", "x must be 'a' or 'b', got 'c'"),
        (choice("a", "b", "c"), "d", "x must be one of 'a', 'b', 'c', got 'd'"),
        (boolean(), "yes", "x must be true or false, got 'yes'"),
        (path(), "", "x must be a file path, got ''"),
        (string(), 5, r"x must be a name \(a non-empty string\), got 5"),
        (string(), "", r"x must be a name \(a non-empty string\), got ''"),
        (strings(), "q_proj", r"x must be a non-empty list of names, e\.g\. \['q_proj', 'k_proj'\], got 'q_proj'"),
        (strings(), [], r"x must be a non-empty list of names, .*, got \[\]"),
        (strings(), ["q_proj", 1], r"x must be a non-empty list of names, .*, got \['q_proj', 1\]"),
        (mapping(), "alpha=1", r"x must be a mapping of option names to values, .*, got 'alpha=1'"),
        (mapping(), {1: 2}, r"x must be a mapping of option names to values, .*, got \{1: 2\}"),
    ],
)
def test_every_check_says_what_it_wanted_and_what_it_got(check, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check("x", value)


def test_good_values_pass_unchanged():
    assert number(0, 2)("x", 2) == 2 and integer(1)("x", 3) == 3 and choice("a")("x", "a") == "a"
    assert boolean()("x", False) is False and path()("x", None) is None and path()("x", "f") == "f"
    assert string()("x", "a") == "a" and strings()("x", ["a", "b"]) == ("a", "b") and strings()("x", None) is None
    assert mapping()("x", {"a": 1}) == {"a": 1} and mapping()("x", None) is None


@dataclasses.dataclass(frozen=True)
class _Example(Options):
    alpha: float = option(0.5, "a number in [0, 1]", number(0, 1))
    steps: int = option(2, "steps", integer(1))

    def check(self) -> None:
        if self.alpha == 1 and self.steps > 1:
            raise ValueError("alpha 1 takes one step")


def test_options_run_their_checks_when_made_frozen_or_not():
    assert _Example().alpha == 0.5
    with pytest.raises(ValueError, match="alpha must be a number in"):
        _Example(alpha=2)
    with pytest.raises(ValueError, match="alpha 1 takes one step"):
        _Example(alpha=1)
    with pytest.raises(SvdkitError, match=r"^example: steps must be a positive integer, got 0$"):
        build_config(_Example, {"steps": 0}, "example")
    with pytest.raises(SvdkitError, match=r"example has no option beta \(its options: alpha, steps\)"):
        build_config(_Example, {"beta": 1}, "example")


def test_build_config_refuses_options_that_are_not_a_mapping():
    with pytest.raises(SvdkitError, match=r"^example: options must be a mapping of option names to values"):
        build_config(_Example, "alpha=1", "example")


@dataclasses.dataclass(frozen=True)
class _Settings(UserOptions):
    WHAT = "settings"

    steps: int = option(2, "steps", integer(1))


def test_user_options_raise_svdkit_errors_prefixed_by_what_they_are():
    assert _Settings(3).steps == 3
    with pytest.raises(SvdkitError, match=r"^settings: steps must be a positive integer, got True$"):
        _Settings(True)


class _Config:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Model:
    def __init__(self, config):
        self.config = config


def test_context_length_reads_max_position_embeddings_and_check_context_refuses_longer_windows():
    assert context_length(_Model(_Config(max_position_embeddings=256))) == 256
    assert context_length(_Model(_Config())) is None and context_length(object()) is None
    assert context_length(_Model(_Config(max_position_embeddings=None))) is None
    multimodal = transformers.Gemma3Config(text_config={"max_position_embeddings": 512})  # the text config's
    assert context_length(_Model(multimodal)) == 512
    check_context(256, 256, "windows", "--seqlen")  # at the limit: fine
    check_context(10**6, None, "windows", "--seqlen")  # no declared context: no check
    message = (
        r"^windows of 257 tokens are longer than the model's context of 256 tokens \(max_position_embeddings\): "
        r"pass --seqlen of at most 256$"
    )
    with pytest.raises(SvdkitError, match=message):
        check_context(257, 256, "windows", "--seqlen")


def test_key_value_assignments_read_json_values():
    assert parse_assignment("alpha=0.5") == ("alpha", 0.5)
    assert parse_assignment("grid=[0.2,0.4]") == ("grid", [0.2, 0.4])
    assert parse_assignment("rule=power") == ("rule", "power") and parse_assignment("x=") == ("x", "")
    for bad in ("alpha", "=1"):
        with pytest.raises(ValueError, match="options are KEY=VALUE"):
            parse_assignment(bad)
