"""The original SD-card import system's guide, followed in its order with framepipe.

Its workflow: an SD card is inserted and the detector sends the card's file list; the backend
keeps only files it has not imported; the small files (QR clips) are copied first and their
QR codes decoded into passenger and booking; the jump's remaining videos are copied and each is
rendered (intro, watermark, splash screen); steps declare ``depends_on``, spawn steps with
``spawn_step()`` and are keyed ``step_name:param`` (``extract_metadata:video1.mp4``); a failed
pipeline is retried from the failed step. What the team adds on moving: the rendered videos
go to the object store (the real S3 server), and the shared folder's copies are removed per
the retention settings (``SHARED_VIDEOS_DELETE_AFTER_UPLOAD``, ``SHARED_VIDEOS_RETENTION_DAYS``)
only once the upload is verified.

Real components: the service on uvicorn with the detector hub, PostgreSQL as the state
database, the S3 server fixture as the object store, the detector as its own process watching
a folder whose subfolders play SD cards (clips from PyAV, QR codes from segno).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.ledger import Ledger
from s3server import REGION, TEST_ENV, S3Server
from test_example_sd_import import (
    EXAMPLE,
    CardMaker,
    Detector,
    copy_in,
    eject,
    ended,
    insert,
    jump_clip,
    running_world,
    sd_settings,
    wait_for,
)
from test_server import AUTH

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")
need_modules("boto3", install="pip install 'framepipe[s3]'")

from retention import retention_from_env  # noqa: E402  (examples/sd_import, on sys.path)

KEY = re.compile(r"(?P<name>[a-z_]+):(?P<label>[A-Za-z0-9_.~-]+)-(?P<hash>[0-9a-f]{12})")
OUTPUT = re.compile(r"bookings/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+-[0-9a-f]{12}\.mp4")


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 server's test credentials for this process's object store (nothing else)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "FRAMEPIPE_S3_")):
            monkeypatch.delenv(name)
    for name, value in TEST_ENV.items():
        monkeypatch.setenv(name, value)


def guide_settings(tmp_path: Path, pg_url: str, s3_server: S3Server, bucket: str) -> Settings:
    return sd_settings(
        tmp_path,
        database_url=pg_url,
        objects_url=f"s3://{bucket}/sd?endpoint={s3_server.endpoint}&region={REGION}",
    )


def shared_files(shared: Path) -> set[str]:
    return {p.relative_to(shared).as_posix() for p in shared.rglob("*") if p.is_file()}


def removed_ledger(settings: Settings) -> dict[str, dict[str, Any]]:
    with StateStore(settings.resolved_database_url) as store:
        return {e.identity: e.meta for e in Ledger(store, "sd_import.removed").entries()}


def objects_in(s3_server: S3Server, bucket: str) -> dict[str, int]:
    listed = s3_server.client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: o["Size"] for o in listed}


def copy_of(card: str, path: str, folder: Path) -> str:
    """The copy in the shared folder of the file ``path`` of the card ``card`` (the card
    folder ``folder``): named by its content's hash too (``card_paths.copy_dest``)."""
    return copy_in(card, folder, path)


@pytest.fixture
def bucket(s3_server: S3Server) -> Iterator[str]:
    name = s3_server.new_bucket()
    yield name
    s3_server.drop_bucket(name)


def test_the_retention_settings_read_as_the_original_system_names_them() -> None:
    keep = retention_from_env({})
    assert keep.keeps_all and keep.describe() == "keep copies"
    both = retention_from_env(
        {"SHARED_VIDEOS_DELETE_AFTER_UPLOAD": "true", "SHARED_VIDEOS_RETENTION_DAYS": "7"}
    )
    assert (both.after_upload, both.days) == (True, 7.0)
    assert both.describe() == "remove copies after upload or after 7 days"
    assert retention_from_env({"SHARED_VIDEOS_RETENTION_DAYS": "0.5"}).days == 0.5
    from framepipe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"SHARED_VIDEOS_RETENTION_DAYS='-1': use a number"):
        retention_from_env({"SHARED_VIDEOS_RETENTION_DAYS": "-1"})
    with pytest.raises(ConfigError, match=r"SHARED_VIDEOS_RETENTION_DAYS='nan'"):
        retention_from_env({"SHARED_VIDEOS_RETENTION_DAYS": "nan"})
    with pytest.raises(ConfigError, match=r"SHARED_VIDEOS_DELETE_AFTER_UPLOAD='sometimes'"):
        retention_from_env({"SHARED_VIDEOS_DELETE_AFTER_UPLOAD": "sometimes"})


def test_the_backend_command_refuses_a_malformed_retention_setting(tmp_path: Path) -> None:
    env = {**os.environ, "SHARED_VIDEOS_RETENTION_DAYS": "a week"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE / "backend.py"), "--shared", str(tmp_path / "shared")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "SHARED_VIDEOS_RETENTION_DAYS='a week': use a number of days >= 0" in proc.stderr


def test_guide_workflow_insert_import_render_upload_then_copies_removed_after_upload(
    tmp_path: Path, pg_url: str, s3_server: S3Server, bucket: str, s3_env: None
) -> None:
    """The guide's workflow 1-6 on one card with two jumps, with
    ``SHARED_VIDEOS_DELETE_AFTER_UPLOAD=true``: the booking videos land in the object store,
    each video's copy is removed once its upload is verified (QR clips stay), every removal
    is a ``release:<file>-<hash>`` step and a ledger entry, and the step keys read as the
    guide's ``extract_metadata:video1.mp4``."""
    settings = guide_settings(tmp_path, pg_url, s3_server, bucket)
    policy = retention_from_env({"SHARED_VIDEOS_DELETE_AFTER_UPLOAD": "true"})
    with running_world(tmp_path, settings, retention=policy) as world:
        server, shared = world["server"], world["shared"]
        maker = CardMaker(world["cards"] / "GOPRO1")
        qr1 = maker.qr('{"booking_id": "B1001", "passenger": "Anna Svensson"}')
        v1 = maker.video()
        qr2 = maker.qr("B1002;Bo Berg")
        v2, v3 = maker.video(), maker.video()
        detector = Detector(server.url, world["watch"], shared, world["tmp"] / "det.log")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            # 1. SD card inserted: the detector lists it and sends the metadata.
            insert(maker.folder, world["watch"])
            done = wait_for("the import", lambda: ended(client, "GOPRO1"), detector=detector)
            assert done["status"] == "completed", done.get("error")
            summary = done["data"]["summary"]
            card = summary["card_id"]
            # 2-4. New files only; the QR clips were copied first and decoded into bookings.
            assert summary["status"] == "imported"
            assert sorted(summary["copied"]) == sorted([qr1, v1, qr2, v2, v3])
            steps = done["steps"]
            copies = [s for s in steps if s["name"] == "copy"]
            small = [s for s in copies if not s["params"].get("video")]
            large = [s for s in copies if s["params"].get("video")]
            assert {s["params"]["path"] for s in small} == {qr1, qr2}
            assert max(s["finished_at"] for s in small) <= min(s["started_at"] for s in large)
            assert summary["bookings"]["B1001"] == {
                "passenger": "Anna Svensson",
                "videos": [v1],
                "outputs": [done["data"][f"render/{v1}"]["key"]],
                "missing": [],
                "not_rendered": [],
            }
            assert summary["bookings"]["B1002"]["videos"] == [v2, v3]
            # 5-6. Each video rendered (intro, watermark, splash) into the object store, one
            # folder per booking, the file's name and its identity hash as the guide shows.
            stored = objects_in(s3_server, bucket)
            keys = {path: done["data"][f"render/{path}"]["key"] for path in (v1, v2, v3)}
            for path, booking in ((v1, "B1001"), (v2, "B1002"), (v3, "B1002")):
                assert OUTPUT.fullmatch(keys[path]), keys[path]
                assert keys[path].startswith(f"bookings/{booking}/{Path(path).stem}-")
            assert set(stored) == {f"sd/{key}" for key in keys.values()}
            assert len(stored) == 3
            for path in (v1, v2, v3):
                render = done["data"][f"render/{path}"]
                assert stored[f"sd/{render['key']}"] == render["size"]

            # Step keys as the guide writes them: the file's name, the hash as identity.
            for s in steps:
                if s["name"] in ("copy", "scan_qr", "extract_metadata", "render"):
                    match = KEY.fullmatch(s["key"])
                    assert match, s["key"]
                    assert match["label"] == Path(s["params"]["path"]).name
            meta_keys = {
                s["params"]["path"]: s["key"] for s in steps if s["name"] == "extract_metadata"
            }
            assert meta_keys[v1].startswith("extract_metadata:GX000002.MP4-")
            progress = world["watcher"].of("pipeline:progress")
            assert any((m["step_key"] or "").startswith("render:GX000004.MP4-") for m in progress)

            # Retention: the videos' copies are gone, the QR clips' copies stay.
            assert shared_files(shared) == {
                copy_of(card, qr1, maker.folder),
                copy_of(card, qr2, maker.folder),
            }
            releases = {s["params"]["copy_path"]: s for s in steps if s["name"] == "release"}
            assert set(releases) == {copy_of(card, p, maker.folder) for p in (v1, v2, v3)}
            for dest, step in releases.items():
                path = next(p for p in (v1, v2, v3) if done["data"][f"copied/{p}"]["dest"] == dest)
                # The copy's name: the card file's and its content's hash.
                assert re.fullmatch(
                    rf"{card}/DCIM/100GOPRO/{Path(path).stem}-[0-9a-f]{{12}}\.MP4", dest
                )
                assert step["key"].startswith(f"release:{Path(dest).name}-")
                assert step["status"] == "completed"
                outcome = done["data"][f"released/{dest}"]
                assert outcome["status"] == "removed"
                render = done["data"][f"render/{path}"]
                assert (outcome["object_key"], outcome["sha256"]) == (
                    render["key"],
                    render["sha256"],
                )
                # A copy goes only after its own render.
                render_step = next(
                    r
                    for r in steps
                    if r["name"] == "render"
                    and copy_of(card, r["params"]["path"], maker.folder) == dest
                )
                assert render_step["finished_at"] <= step["started_at"]
            assert sorted(summary["removed"]) == sorted(releases) and summary["kept"] == {}
            audit = removed_ledger(settings)
            assert set(audit) == set(releases)
            assert all(a["execution_id"] == done["id"] for a in audit.values())
            spawned = [
                m["event"]
                for m in world["watcher"].of("event")
                if m["event"]["type"] == "step.spawned"
                and (m["event"]["step_key"] or "").startswith("release:")
            ]
            assert len(spawned) == 3  # auditable on the event stream too


def test_guide_a_failed_upload_keeps_the_copies_and_a_retry_from_the_failed_step_removes_them(
    tmp_path: Path, pg_url: str, s3_server: S3Server, s3_env: None
) -> None:
    """The object store refuses the upload (its bucket is gone once the service runs): the
    render fails, the execution fails and every copy stays in the shared folder. Once the
    bucket is back, a retry from the failed step uploads, verifies and only then removes the
    videos' copies; nothing is copied again."""
    name = s3_server.new_bucket()
    settings = guide_settings(tmp_path, pg_url, s3_server, name)
    policy = retention_from_env({"SHARED_VIDEOS_DELETE_AFTER_UPLOAD": "yes"})
    with running_world(tmp_path, settings, retention=policy) as world:
        server, shared = world["server"], world["shared"]
        maker = CardMaker(world["cards"] / "UPLOAD")
        qr = maker.qr("B2001;Cleo Lind")
        videos = [maker.video(), maker.video()]
        detector = Detector(server.url, world["watch"], shared, world["tmp"] / "det.log")
        world["detectors"].append(detector.start())
        s3_server.drop_bucket(name)  # uploads now fail
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            insert(maker.folder, world["watch"])
            failed = wait_for("the import", lambda: ended(client, "UPLOAD"), detector=detector)
            assert failed["status"] == "failed"
            assert "render:GX00000" in failed["error"]  # the readable key of the failed step
            assert "NoSuchBucket" in failed["error"] or "does not exist" in failed["error"]
            card = failed["inputs"]["card_id"]
            assert shared_files(shared) == {copy_of(card, p, maker.folder) for p in (qr, *videos)}
            assert not [s for s in failed["steps"] if s["name"] == "release"]
            assert removed_ledger(settings) == {}

            s3_server.client.create_bucket(Bucket=name)
            try:
                retried = client.post(f"/api/executions/{failed['id']}/retry")
                assert retried.status_code == 202, retried.text
                done = wait_for("the retry", lambda: ended(client, "UPLOAD"), detector=detector)
                assert done["status"] == "completed", done.get("error")
                assert shared_files(shared) == {copy_of(card, qr, maker.folder)}
                assert set(done["data"]["summary"]["removed"]) == {
                    copy_of(card, v, maker.folder) for v in videos
                }
                assert all(
                    s["attempt"] == 1 for s in done["steps"] if s["name"] == "copy"
                )  # not copied again
                assert set(removed_ledger(settings)) == {
                    copy_of(card, v, maker.folder) for v in videos
                }
                assert len(objects_in(s3_server, name)) == 2
            finally:
                s3_server.drop_bucket(name)


def test_guide_after_n_days_removes_only_verified_copies_no_unfinished_import_lists(
    tmp_path: Path, pg_url: str, s3_server: S3Server, bucket: str, s3_env: None
) -> None:
    """``SHARED_VIDEOS_RETENTION_DAYS`` (here a few seconds' worth of a day): copies stay
    until they are that old; then each import's sweep removes those whose upload is verified.
    A copy whose object was damaged in the store is kept (and removed once it is whole again);
    a copy that an import which has not completed lists is kept until that import
    completes."""
    seconds = 4.0
    days = seconds / 86_400
    settings = guide_settings(tmp_path, pg_url, s3_server, bucket)
    policy = retention_from_env({"SHARED_VIDEOS_RETENTION_DAYS": repr(days)})
    intro = tmp_path / "assets" / "intro.mp4"
    intro.parent.mkdir()
    jump_clip(intro, seed=7, frames=5)
    options = {"retention": policy, "extra_inputs": {"intro": str(intro)}}
    with running_world(tmp_path, settings, **options) as world:
        server, shared = world["server"], world["shared"]
        a = CardMaker(world["cards"] / "CARDA")
        qr1 = a.qr("B3001;Dana Holm")
        v1, v2 = a.video(), a.video()
        detector = Detector(server.url, world["watch"], shared, world["tmp"] / "det.log")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:

            def removed_card(mounted: Path) -> None:
                eject(mounted)
                wait_for(
                    "the card's removal",
                    lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
                    detector=detector,
                )

            # A first import: nothing is old enough yet.
            mounted = insert(a.folder, world["watch"])
            first = wait_for("import 1", lambda: ended(client, "CARDA"), detector=detector)
            assert first["status"] == "completed", first.get("error")
            card_a = first["data"]["summary"]["card_id"]
            assert first["data"]["retention"]["due"] == []
            assert shared_files(shared) == {copy_of(card_a, p, a.folder) for p in (qr1, v1, v2)}
            v1_key = "sd/" + first["data"][f"render/{v1}"]["key"]
            whole = s3_server.client.get_object(Bucket=bucket, Key=v1_key)["Body"].read()
            s3_server.client.put_object(Bucket=bucket, Key=v1_key, Body=whole[: len(whole) // 2])
            started = time.monotonic()

            # A re-insert with a new jump fails (its intro is gone): it lists card A's files.
            removed_card(mounted)
            qr2 = a.qr("B3002;Erik Berg")
            v3 = a.video()
            intro.unlink()
            mounted = insert(a.folder, world["watch"])
            second = wait_for("import 2", lambda: ended(client, "CARDA", 2), detector=detector)
            assert second["status"] == "failed"
            removed_card(mounted)
            jump_clip(intro, seed=7, frames=5)
            time.sleep(max(0.0, seconds - (time.monotonic() - started)))  # until they are due

            # Another card's import sweeps: card A's copies are due but listed by import 2.
            b = CardMaker(world["cards"] / "CARDB")
            b.qr("B3003;Fia Ek")
            b.video()
            mounted_b = insert(b.folder, world["watch"])
            third = wait_for("import 3", lambda: ended(client, "CARDB"), detector=detector)
            assert third["status"] == "completed", third.get("error")
            kept = third["data"]["summary"]["kept"]
            assert set(kept) == {copy_of(card_a, v1, a.folder), copy_of(card_a, v2, a.folder)}
            assert all(f"execution {second['id'][:12]}" in why for why in kept.values())
            assert copy_of(card_a, v1, a.folder) in shared_files(shared)
            removed_card(mounted_b)

            # Import 2 retried: it completes, and its sweep finds v1's object damaged.
            assert client.post(f"/api/executions/{second['id']}/retry").status_code == 202
            second = wait_for("import 2 again", lambda: ended(client, "CARDA", 2))
            assert second["status"] == "completed", second.get("error")
            summary = second["data"]["summary"]
            assert [r for r in summary["removed"] if r.startswith(card_a)] == [
                copy_of(card_a, v2, a.folder)
            ]
            assert (
                f"has {len(whole) // 2} bytes, the upload had {len(whole)}"
                in (summary["kept"][copy_of(card_a, v1, a.folder)])
            )
            assert copy_of(card_a, v3, a.folder) in shared_files(
                shared
            )  # uploaded just now: not due

            # The object made whole again: the next import's sweep removes the copy.
            s3_server.client.put_object(Bucket=bucket, Key=v1_key, Body=whole)
            time.sleep(seconds)
            insert(a.folder, world["watch"])
            fourth = wait_for("import 3 of card A", lambda: ended(client, "CARDA", 3))
            assert fourth["status"] == "completed", fourth.get("error")
            assert fourth["data"]["summary"]["status"] == "nothing_new"
            left = shared_files(shared)
            assert (
                copy_of(card_a, v1, a.folder) not in left
                and copy_of(card_a, v3, a.folder) not in left
            )
            assert {
                copy_of(card_a, qr1, a.folder),
                copy_of(card_a, qr2, a.folder),
            } <= left  # QR clips stay
            audit = removed_ledger(settings)
            assert audit[copy_of(card_a, v2, a.folder)]["execution_id"] == second["id"]
            assert audit[copy_of(card_a, v1, a.folder)]["execution_id"] == fourth["id"]
            assert audit[copy_of(card_a, v1, a.folder)]["object_size"] == len(whole)


def test_a_link_planted_in_place_of_a_copy_is_neither_followed_nor_removed(
    tmp_path: Path,
) -> None:
    """release_copy on a shared folder where the copy (or its folder) became a symbolic link
    to a file outside: kept, with the reason; the link and its target stay."""
    from retention import release_copy

    from framepipe.backends.objects import LocalObjectStore
    from framepipe.jobs.ledger import LedgerEntry, content_hash, file_fingerprint

    shared, outside = tmp_path / "shared", tmp_path / "outside"
    (shared / "CARD" / "DCIM").mkdir(parents=True)
    outside.mkdir()
    target = jump_clip(outside / "GX000002.MP4", seed=1, frames=3)
    rendered = jump_clip(tmp_path / "rendered.mp4", seed=2, frames=3)
    with LocalObjectStore(tmp_path / "objects") as objects:
        info = objects.put_file("bookings/B1/GX000002.mp4", rendered)
        entry = LedgerEntry(
            namespace="sd_import.rendered",
            identity="CARD/DCIM/GX000002.MP4",
            content_hash=None,
            size=target.stat().st_size,
            meta={
                "object_key": "bookings/B1/GX000002.mp4",
                "object_size": info.size,
                "sha256": content_hash(rendered),
                "size": target.stat().st_size,
                "fingerprint": file_fingerprint(target),
            },
            execution_id=None,
            step_key=None,
            imported_at=time.time(),
        )
        (shared / "CARD" / "DCIM" / "GX000002.MP4").symlink_to(target)
        kept = release_copy(
            shared_dir=shared,
            dest=entry.identity,
            entry=entry,
            objects=objects,
            referenced_by=None,
            work=tmp_path,
        )
        assert kept == {
            "status": "kept",
            "reason": "it is not a regular file (a link?); not followed",
        }
        (shared / "CARD" / "DCIM" / "GX000002.MP4").unlink()
        (shared / "CARD" / "DCIM").rmdir()
        (shared / "CARD" / "DCIM").symlink_to(outside)  # the folder itself a link
        kept = release_copy(
            shared_dir=shared,
            dest=entry.identity,
            entry=entry,
            objects=objects,
            referenced_by=None,
            work=tmp_path,
        )
        assert kept["status"] == "kept" and "symbolic link" in kept["reason"]
        assert target.exists() and (shared / "CARD" / "DCIM").is_symlink()
