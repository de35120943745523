"""Settings from FRAMEPIPE_* variables and the config file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from framepipe.config import (
    COMPONENT_FILE_KEYS,
    OTHER_VARIABLES,
    SECTIONS,
    JobSettings,
    MediaSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    WorkerSettings,
    check_environment,
    load_section,
    load_settings,
)
from framepipe.errors import ConfigError
from framepipe.media.limits import DEFAULT_MAX_PIXELS
from framepipe.pipelines.ml_settings import MlVideoSettings


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / '.framepipe' / 'state.db'}"
    assert s.resolved_objects_url == (tmp_path / ".framepipe" / "objects").as_uri()
    assert s.broker_url == "memory://"


def test_env_overrides_file_overrides_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
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


# -- the sections --------------------------------------------------------------------------------


def test_every_setting_is_in_exactly_one_section() -> None:
    owners: dict[str, list[str]] = {}
    for group, section in SECTIONS.items():
        assert issubclass(Settings, section), group
        for name in section.model_fields:
            owners.setdefault(name, []).append(group)
    assert set(owners) == set(Settings.model_fields)
    assert {name: groups for name, groups in owners.items() if len(groups) > 1} == {}


def test_every_variable_and_key_works_flat_on_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Grouping changed no name: FRAMEPIPE_<FIELD>, the config-file key <field>, the keyword
    argument and settings.<field> are what they were, for every field of every section."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_SHUTDOWN_GRACE", "2.5")
    monkeypatch.setenv("FRAMEPIPE_BROKER_NAMESPACE", "blue")
    monkeypatch.setenv("FRAMEPIPE_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    (tmp_path / "framepipe.toml").write_text(
        'media_max_pixels = 0\nlease_seconds = 3.0\nhome = "state"\nevents_retention_days = 7\n'
    )
    s = load_settings(api_token="tok")
    assert (s.shutdown_grace, s.broker_namespace, s.media_max_pixels, s.lease_seconds) == (
        2.5,
        "blue",
        0,
        3.0,
    )
    assert s.allowed_origins == ["https://a.example", "https://b.example"]
    assert (s.home, s.run_dir, s.events_retention_days, s.api_token) == (
        Path("state"),
        Path("state/run"),
        7,
        "tok",
    )
    assert s.model_copy(update={"concurrency": 2}).concurrency == 2
    with pytest.raises(ConfigError, match="FRAMEPIPE_API_TOKEN"):
        load_settings(api_token=" spaced ")


def test_a_section_loads_alone_and_a_settings_object_is_each_section(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "framepipe.toml").write_text("max_upload_bytes = 10\nconcurrency = 3\n")
    monkeypatch.setenv("FRAMEPIPE_INPUT_ROOTS", "/srv/a,/srv/b")
    server = load_section(ServerSettings)  # the other sections' keys in the file are not its
    assert (server.max_upload_bytes, server.input_roots) == (10, [Path("/srv/a"), Path("/srv/b")])
    assert not hasattr(server, "concurrency")
    assert load_section(JobSettings).concurrency == 3

    def upload_limit(settings: ServerSettings) -> int:  # a component typed by what it reads
        return settings.max_upload_bytes

    assert upload_limit(load_settings()) == 10
    assert isinstance(load_settings(), StorageSettings | WorkerSettings | MediaSettings)
    assert MediaSettings().media_max_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ConfigError, match="concurrency: no such setting"):
        load_section(MediaSettings, concurrency=2)  # a keyword of another section
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "-1")
    with pytest.raises(ConfigError, match="FRAMEPIPE_MEDIA_MAX_PIXELS"):
        load_section(MediaSettings)


def test_distributed_jobs_is_the_workers_section(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings(broker_url="redis://127.0.0.1:6379/0").distributed_jobs
    assert WorkerSettings(broker_url="amqp://h/", jobs_mode="local").distributed_jobs is False
    assert WorkerSettings(jobs_mode="workers").distributed_jobs


def test_unknown_config_file_keys_are_refused_but_the_ml_pipelines_are_left_to_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "framepipe.toml"
    path.write_text("concurency = 3\n")
    with pytest.raises(ConfigError, match="concurency: no such setting"):
        load_settings()
    path.write_text("concurrency = 3\nmodel_api_retries = 2\nmodel_api_retry_max = 4.0\n")
    settings = load_settings()
    assert settings.concurrency == 3 and not hasattr(settings, "model_api_retries")
    assert MlVideoSettings.file_keys <= COMPONENT_FILE_KEYS
    assert MlVideoSettings.load({}).model_api_retries == 2
    with pytest.raises(ConfigError, match="model_api_retries: no such setting"):
        load_settings(model_api_retries=2)  # not a keyword of framepipe's settings any more
    path.write_text("concurrency = \n")
    with pytest.raises(ConfigError, match=r"framepipe\.toml"):
        load_settings()


def _readme_groups() -> dict[str, set[str]]:
    """The README's configuration tables: section class -> the variables listed under it."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = text[text.index("## Configuration") :]
    text = text[: text.index("\n## ", 5)]
    groups: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"### .*\(`(\w+)`\)", line)
        if heading:
            current = groups.setdefault(heading.group(1), set())
        elif current is not None and line.startswith("| `FRAMEPIPE_"):
            current.add(line.split("`")[1])
    return groups


def test_the_readme_lists_every_setting_under_its_group() -> None:
    expected = {
        section.__name__: {f"FRAMEPIPE_{name.upper()}" for name in section.model_fields}
        for section in SECTIONS.values()
    }
    assert _readme_groups() == expected


# -- refused at load: misspelt variables, bad URLs, homes and numbers -----------------------------

# Misspelt on purpose below; the tree's own FRAMEPIPE_* names are checked against the settings.
TYPOS = {"FRAMEPIPE_CONCURENCY", "FRAMEPIPE_API_TOKN", "FRAMEPIPE_BROKER_URI", "FRAMEPIPE_NOPE"}


def test_a_misspelt_variable_is_refused_naming_it_and_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_CONCURENCY", "3")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "FRAMEPIPE_CONCURENCY: no such setting (did you mean FRAMEPIPE_CONCURRENCY?)" in str(
        caught.value
    )
    with pytest.raises(ConfigError, match="FRAMEPIPE_CONCURENCY"):
        load_section(MediaSettings)  # a section alone refuses it too
    monkeypatch.delenv("FRAMEPIPE_CONCURENCY")
    monkeypatch.setenv("framepipe_api_tokn", "S3cretToken")  # any case, like the settings
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "did you mean FRAMEPIPE_API_TOKEN?" in str(caught.value)
    assert "S3cretToken" not in str(caught.value)  # the value is never shown
    monkeypatch.delenv("framepipe_api_tokn")
    monkeypatch.setenv("FRAMEPIPE_BROKER_URI", "redis://h/0")
    with pytest.raises(ConfigError, match="did you mean FRAMEPIPE_BROKER_URL"):
        load_settings()


def test_variables_read_elsewhere_and_other_sections_variables_are_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf.toml").write_text("concurrency = 2\n")
    for name in OTHER_VARIABLES:
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("FRAMEPIPE_CONFIG", str(tmp_path / "conf.toml"))
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "100")
    assert load_settings().concurrency == 2
    monkeypatch.setenv("FRAMEPIPE_CONCURRENCY", "3")  # a setting, though not MediaSettings'
    assert load_section(MediaSettings).media_max_pixels == 100
    check_environment({"FRAMEPIPE_HOME": "x", "OTHER_THING": "y"})
    with pytest.raises(ConfigError, match="FRAMEPIPE_NOPE"):
        check_environment({"FRAMEPIPE_NOPE": "x"})


def test_every_framepipe_variable_the_tree_names_is_a_setting_or_listed() -> None:
    """The allow-list is kept whole: every ``FRAMEPIPE_*`` name written anywhere in the tree
    (code, examples, tests, benchmarks, docs, CI) is a setting or in OTHER_VARIABLES."""
    root = Path(__file__).resolve().parent.parent
    known = {f"FRAMEPIPE_{name.upper()}" for name in Settings.model_fields} | set(OTHER_VARIABLES)
    found: dict[str, str] = {}
    folders = [root / name for name in ("src", "examples", "tests", "benchmarks", "docs", ".ci")]
    files = [root / "README.md", *(f for d in folders for f in d.rglob("*") if f.is_file())]
    for file in files:
        if "__pycache__" in file.parts or file.suffix in {".png", ".jpg", ".mp4", ".pyc"}:
            continue
        try:
            text = file.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for name in re.findall(r"FRAMEPIPE_[A-Z0-9_]+", text):
            if not name.endswith("_"):  # a prefix (FRAMEPIPE_S3_*, f"FRAMEPIPE_{...}")
                found.setdefault(name, str(file.relative_to(root)))
    unknown = {name: where for name, where in found.items() if name not in known | TYPOS}
    assert unknown == {}
    assert {"FRAMEPIPE_TEST_POSTGRES_URL", "FRAMEPIPE_NAMESPACE"} <= set(found)


SECRET = "S3cretPW"


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("FRAMEPIPE_DATABASE_URL", "garbage", "does not parse"),
        ("FRAMEPIPE_DATABASE_URL", f"alice:{SECRET}@127.0.0.1/test", "does not parse"),
        (
            "FRAMEPIPE_DATABASE_URL",
            f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:5432x/test",
            "port is not a number",
        ),
        ("FRAMEPIPE_DATABASE_URL", f"mysql://alice:{SECRET}@127.0.0.1/x", "SQLite or PostgreSQL"),
        ("FRAMEPIPE_BROKER_URL", "redis:/127.0.0.1:6379/0", "it begins 'redis:/'"),
        ("FRAMEPIPE_BROKER_URL", f"bogus://:{SECRET}@x", "it begins 'bogus://'"),
        ("FRAMEPIPE_BROKER_URL", f"{SECRET}@127.0.0.1", "not a broker URL"),
        # a '/' in a password ends urllib's host part early: its "port" was the password
        ("FRAMEPIPE_BROKER_URL", f"redis://:{SECRET}/x@127.0.0.1:6379/0", "must be percent-enc"),
        ("FRAMEPIPE_BROKER_URL", f"amqp://u:{SECRET}#x@127.0.0.1:5672/", "must be percent-enc"),
        ("FRAMEPIPE_BROKER_URL", f"rediss://u:{SECRET}@127.0.0.1:63x79/0", "do not parse"),
        ("FRAMEPIPE_BROKER_URL", f"redis://:{SECRET}\uff20cache:6379/0", "do not parse"),
        ("FRAMEPIPE_BROKER_URL", f"redis://us[er:{SECRET}@cache:6379/0", "do not parse"),
        ("FRAMEPIPE_BROKER_URL", f"amqp://ops team:{SECRET}/x@mq:5672/", "do not parse"),
        ("FRAMEPIPE_OBJECTS_URL", f"bogus://u:{SECRET}@x", "scheme 'bogus'"),
        ("FRAMEPIPE_OBJECTS_URL", f"s3://k:{SECRET}@bucket/x", "carries credentials"),
        ("FRAMEPIPE_OBJECTS_URL", f"s3://bucket/x?secret={SECRET}", "unknown option 'secret'"),
        ("FRAMEPIPE_OBJECTS_URL", "s3://bucket/x?create=maybe", "expected 1 or 0"),
        ("FRAMEPIPE_OBJECTS_URL", "s3://bu*ket/x", "invalid S3 bucket name"),
        ("FRAMEPIPE_OBJECTS_URL", "s3://bucket/x?endpoint=ftp://h", "invalid S3 endpoint"),
        ("FRAMEPIPE_OBJECTS_URL", f"file://u:{SECRET}@nas/srv", "names host 'nas'"),
        ("FRAMEPIPE_SHUTDOWN_GRACE", "inf", "finite"),
        ("FRAMEPIPE_LEASE_SECONDS", "nan", "finite"),
        ("FRAMEPIPE_HEARTBEAT_INTERVAL", "inf", "finite"),
        ("FRAMEPIPE_RETRY_INITIAL_DELAY", "nan", "finite"),
        ("FRAMEPIPE_EVENTS_RETENTION_DAYS", "inf", "finite"),
        ("FRAMEPIPE_ALLOWED_ORIGINS", "https://a.example, *", "'*' is not a web origin"),
        ("FRAMEPIPE_ALLOWED_ORIGINS", "https://a.example/app", "no '*', path or user"),
        ("FRAMEPIPE_ALLOWED_ORIGINS", f"https://u:{SECRET}@a.example", "not a web origin"),
        ("FRAMEPIPE_ALLOWED_ORIGINS", "a.example:5173", "not a web origin"),
        # an undecodable byte of the environment (Python reads it as a lone surrogate): no
        # broker, Redis key or Host header can carry it, so it is refused at load
        ("FRAMEPIPE_MQTT_URL", f"mqtt://user:{SECRET}\udcff@broker/fp", "not UTF-8"),
        ("FRAMEPIPE_MQTT_URL", "mqtt://bro\udcffker/fp", "not UTF-8"),
        ("FRAMEPIPE_MQTT_URL", "mqtt://broker/fp?client_id=cam\udcff", "not UTF-8"),
        ("FRAMEPIPE_BROKER_URL", f"redis://:{SECRET}\udcff@127.0.0.1:6379/0", "not UTF-8"),
        # a socket's path may hold any bytes, but not its password
        ("FRAMEPIPE_BROKER_URL", f"unix://:{SECRET}\udcff@/run/redis.sock", "not UTF-8"),
        ("FRAMEPIPE_BROKER_URL", f"redis://:{SECRET}%FF@127.0.0.1:6379/0", "not UTF-8"),
        ("FRAMEPIPE_BROKER_URL", f"amqp://u%C3:{SECRET}@127.0.0.1:5672/", "not UTF-8"),
        ("FRAMEPIPE_BROKER_NAMESPACE", "fp\udcff", "not UTF-8"),
        ("FRAMEPIPE_ALLOWED_HOSTS", "cam\udcff.example", "not UTF-8"),
        ("FRAMEPIPE_ALLOWED_ORIGINS", "https://cam\udcff.example", "not UTF-8"),
    ],
)
def test_bad_values_are_refused_at_load_naming_the_setting_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{variable}: " in message
    assert needle in message
    assert SECRET not in message
    assert SECRET not in str(caught.value.__cause__)  # nor in the chained validation error


def test_a_home_that_is_a_file_or_inside_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ConfigError, match=r"FRAMEPIPE_HOME: .*a-file is not a folder"):
        load_settings(home=file)
    with pytest.raises(ConfigError, match=r"FRAMEPIPE_HOME: .*is inside .*a-file, a file"):
        load_settings(home=file / "deeper" / "home")
    assert load_settings(home=tmp_path / "new" / "home").home == tmp_path / "new" / "home"
    assert load_settings(home=tmp_path).home == tmp_path


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite+pysqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:state?mode=memory&cache=shared&uri=true",
    ],
)
def test_an_in_memory_sqlite_state_database_is_refused_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_DATABASE_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "FRAMEPIPE_DATABASE_URL: an in-memory SQLite database cannot be" in message
    assert "each connection would get its own empty database; give a file path" in message


@pytest.mark.parametrize("where", ["variable", "file", "keyword"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_home_is_unset_not_the_current_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str, blank: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if where == "variable":
        monkeypatch.setenv("FRAMEPIPE_HOME", blank)
    elif where == "file":
        (tmp_path / "framepipe.toml").write_text(f'home = "{blank}"\n')
    settings = load_settings(**({"home": blank} if where == "keyword" else {}))
    assert settings.home == Path(".framepipe")
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / '.framepipe' / 'state.db'}"


@pytest.mark.parametrize("where", ["variable", "file", "keyword"])
def test_a_relative_input_root_is_refused_naming_the_setting_and_the_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    """An input root is where HTTP clients may read files from: a relative one would be a
    different folder for each directory the service happens to start (and each submit) in,
    so it is refused at load, named, rather than resolved against the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "uploads").mkdir()
    if where == "variable":
        monkeypatch.setenv("FRAMEPIPE_INPUT_ROOTS", f"{tmp_path},uploads")
    elif where == "file":
        (tmp_path / "framepipe.toml").write_text(f'input_roots = ["{tmp_path}", "uploads"]\n')
    overrides = {"input_roots": [tmp_path, Path("uploads")]} if where == "keyword" else {}
    with pytest.raises(ConfigError) as caught:
        load_section(ServerSettings, **overrides)
    message = str(caught.value)
    assert "FRAMEPIPE_INPUT_ROOTS: " in message
    assert "'uploads' is not an absolute path" in message
    with pytest.raises(
        ConfigError, match=r"FRAMEPIPE_INPUT_ROOTS: .*'~/videos' is not an absolute"
    ):
        load_settings(input_roots="~/videos")  # not expanded: the shell does that, or nothing
    monkeypatch.delenv("FRAMEPIPE_INPUT_ROOTS", raising=False)
    (tmp_path / "framepipe.toml").unlink(missing_ok=True)
    assert load_settings(input_roots=f" {tmp_path} ,").input_roots == [tmp_path]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("broker_url", "memory://"),
        ("broker_url", "redis://:pw@127.0.0.1:6379/0"),
        ("broker_url", "rediss://h:6380/1"),
        ("broker_url", "unix:///run/redis.sock"),
        ("broker_url", "amqp://guest:guest@h:5672/"),
        ("broker_url", "amqps://h/vhost"),
        ("objects_url", "/srv/objects"),
        ("objects_url", "relative/objects"),
        ("objects_url", "file:///srv/objects"),
        ("objects_url", "FILE:///srv/objects"),
        ("objects_url", "s3://bucket/prefix?endpoint=http://127.0.0.1:1&region=x"),
        ("database_url", "sqlite:///state.db"),
        ("database_url", "postgresql+psycopg://u:p@db:5432/x?options=-csearch_path%3Ds"),
        ("database_url", "postgresql://db/x"),
        ("shutdown_grace", 0.0),
        ("events_retention_days", 0.5),
    ],
)
def test_good_values_are_kept_as_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: object
) -> None:
    monkeypatch.chdir(tmp_path)
    assert getattr(load_settings(**{name: value}), name) == value


def test_a_redis_socket_path_that_is_not_utf8_is_a_file_name_and_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_BROKER_URL", "unix:///run/caf\udce9/redis.sock")
    assert load_settings().broker_url == "unix:///run/caf\udce9/redis.sock"


def test_the_broker_url_is_checked_at_load_and_blank_is_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_BROKER_URL", "")
    assert not load_settings().distributed_jobs
    with pytest.raises(ConfigError, match="FRAMEPIPE_BROKER_URL: not a broker URL"):
        load_section(WorkerSettings, broker_url="http://127.0.0.1/")
    # Built in code, settings may carry any URL: read as in-process, refused by a worker.
    assert not WorkerSettings(broker_url="http://127.0.0.1/").distributed_jobs
