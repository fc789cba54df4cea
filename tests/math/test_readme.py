"""The README's math examples run as doctests: what they print is what the library gives."""

import doctest
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_examples():
    result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8, "the README's math examples are gone"
    assert result.failed == 0
