"""An object store URL that is wrong (FRAMEPIPE_OBJECTS_URL, ``open_object_store(url)``) is a
setting to fix: :class:`ConfigError` naming the wrong part, never a password or a secret query
value of the URL, and ``framepipe serve`` refuses to start on it (one line, exit 2).

Found in review: these were raised as :class:`ObjectStoreError`, the error of a store that is
away, so ``framepipe serve`` started without the store and tried the same URL again forever;
an unknown option repeated the whole URL, secrets included; a password written with ``/`` in
it showed in the bucket name refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from framepipe.backends.objects import open_object_store
from framepipe.errors import ConfigError, ObjectStoreError
from waiting import free_port

PASSWORD = "pw-never-shown"
SECRET = "sv-never-shown"


@pytest.mark.parametrize(
    ("url", "wrong"),
    [
        (f"s3://AKIA:{PASSWORD}@frames/cam?secret={SECRET}", "carries credentials"),
        (f"s3://AKIA:{PASSWORD}/x@frames/cam", "carries credentials"),
        (
            f"s3://frames/cam?endpoint=http://alice:{PASSWORD}@127.0.0.1:9&secret={SECRET}",
            "unknown option 'secret'; S3 URLs take endpoint, region, create",
        ),
        (
            f"s3://frames?endpoint=http://alice:{PASSWORD}@127.0.0.1:9&endpoint=http://h:1"
            f"&api_key={SECRET}",
            "option 'endpoint' given twice",
        ),
        (
            f"s3://frames?endpoint=http://alice:{PASSWORD}@127.0.0.1:9&create=maybe",
            "create='maybe', expected 1 or 0",
        ),
        (f"s3://frames?endpoint=http://127.0.0.1:9/?token={SECRET}", "carries credentials"),
        (f"s3://frames?endpoint=http://alice:{PASSWORD}/x@127.0.0.1:9", "carries credentials"),
        (f"s3://frames?token={SECRET}#part", "no #fragment"),
        (f"file://alice:{PASSWORD}@otherhost/x?secret={SECRET}", "names host 'otherhost'"),
        (f"file:///tmp/x?secret={SECRET}", "file URLs take no options"),
        (f"ftp://alice:{PASSWORD}@h/x?token={SECRET}", "scheme 'ftp'"),
    ],
)
def test_a_wrong_url_is_a_config_error_naming_the_part_without_secrets(
    url: str, wrong: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        open_object_store(url)
    message = str(excinfo.value)
    assert not isinstance(excinfo.value, ObjectStoreError)
    assert wrong in message
    assert PASSWORD not in message and SECRET not in message
    assert "***" in message  # the URL is shown, its secrets masked


@pytest.mark.slow
def test_framepipe_serve_refuses_an_unknown_option_at_start_in_one_line(tmp_path: Path) -> None:
    """Not the warning of a store that is away and a service retrying it forever."""
    url = (
        f"s3://frames/cam?endpoint=http://alice:{PASSWORD}@127.0.0.1:{free_port()}&secret={SECRET}"
    )
    env = {**os.environ, "FRAMEPIPE_OBJECTS_URL": url}
    args = [sys.executable, "-m", "framepipe", "--home", str(tmp_path), "serve", "--port", "0"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until it exits, or serves
            if "Dashboard:" in line:
                proc.terminate()
                pytest.fail(f"framepipe serve started with {url}: {proc.communicate(timeout=60)}")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    assert "FRAMEPIPE_OBJECTS_URL: object store URL " in lines[0]
    assert "unknown option 'secret'" in lines[0]
    assert PASSWORD not in err + out and SECRET not in err + out
