"""shared_fixture(): a missing ../shared path skips a test locally but fails it under CI."""

from __future__ import annotations

import pytest
import shared_fixtures
from shared_fixtures import shared_fixture


@pytest.fixture
def shared_root(tmp_path, monkeypatch):
    (tmp_path / "fixtures" / "present").mkdir(parents=True)
    monkeypatch.setattr(shared_fixtures, "SHARED", tmp_path)
    return tmp_path


@pytest.mark.parametrize("ci", ["true", "1", "yes", "True"])
def test_missing_path_fails_under_ci_naming_it(shared_root, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as e:
        shared_fixture("fixtures/absent/model.pkl")
    assert str(shared_root / "fixtures" / "absent" / "model.pkl") in str(e.value)


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_path_skips_outside_ci_naming_it(shared_root, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception) as e:
        shared_fixture("fixtures/absent")
    assert str(shared_root / "fixtures" / "absent") in str(e.value)


def test_present_path_is_returned_in_and_out_of_ci(shared_root, monkeypatch):
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        assert shared_fixture("fixtures/present") == shared_root / "fixtures" / "present"
