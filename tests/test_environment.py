"""``environment_variable``: a variable set, removed or left for a block leaves it as it came in."""

from __future__ import annotations

import os

from awr_modules.environment import environment_variable

NAME = "AWR_TEST_VARIABLE"


def test_a_set_or_removed_variable_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv(NAME, "before")
    with environment_variable(NAME, "inside"):
        assert os.environ[NAME] == "inside"
    assert os.environ[NAME] == "before"
    with environment_variable(NAME, None):
        assert NAME not in os.environ
    assert os.environ[NAME] == "before"


def test_what_the_block_sets_is_undone_and_an_absent_variable_stays_absent(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with environment_variable(NAME):
        assert NAME not in os.environ
        os.environ[NAME] = "set by the block"
    assert NAME not in os.environ
