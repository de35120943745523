"""Settings from FRAMEPIPE_* variables and the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from framepipe.config import load_settings
from framepipe.errors import ConfigError


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / '.framepipe' / 'state.db'}"
    assert s.resolved_objects_url == (tmp_path / ".framepipe" / "objects").as_uri()
    assert s.broker_url == "memory://"


def test_env_overrides_file_overrides_default(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "framepipe.toml").write_text('concurrency = 3\nlog_level = "debug"\n')
    assert load_settings().concurrency == 3
    assert load_settings().log_level == "DEBUG"
    monkeypatch.setenv("FRAMEPIPE_CONCURRENCY", "7")
    assert load_settings().concurrency == 7
    assert load_settings(concurrency=9).concurrency == 9


def test_explicit_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "conf.toml"
    path.write_text('database_url = "postgresql+psycopg://db/x"\n')
    monkeypatch.setenv("FRAMEPIPE_CONFIG", str(path))
    assert load_settings().resolved_database_url == "postgresql+psycopg://db/x"
    monkeypatch.setenv("FRAMEPIPE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_settings()


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMEPIPE_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match=r"FRAMEPIPE_CONCURRENCY"):
        load_settings()
    monkeypatch.delenv("FRAMEPIPE_CONCURRENCY")
    with pytest.raises(ConfigError, match="FRAMEPIPE_LOG_LEVEL"):
        load_settings(log_level="loud")
