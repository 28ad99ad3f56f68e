"""Regressions for bad input: each case once failed with Error.Failed, hung, or changed files.

Every refused call must raise a named error and leave the configuration, the kernel
stand-in, the state file and every file it named as they were.
"""

import hashlib
import json
import os
import threading

import pytest

from applianced import validation
from applianced.errors import AlreadyExists, ApplianceError, InvalidArgument
from applianced.iscsi import diskfile, targetcli
from applianced.state import Config, StateStore
from tests.unit.test_engine import INITIATOR, make_engine, populate, run, saveconfig, started

DEEP = 100_000


def fingerprint(*paths):
    """Bytes and modification times of files, to compare before and after a refused call."""
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.exists() else None
        for p in paths
    }


async def refused(engine, call, error=InvalidArgument, match=None, files=()):
    """Run ``call``; it must fail with ``error`` and change nothing the engine owns."""
    before = (engine.config, engine.kernel.snapshot(), engine.store.path.read_bytes(), fingerprint(*files))
    with pytest.raises(error, match=match) as caught:
        await call
    after = (engine.config, engine.kernel.snapshot(), engine.store.path.read_bytes(), fingerprint(*files))
    assert after == before
    for text in ("Error(", "Traceback", "<class"):
        assert text not in str(caught.value), "error texts carry no Python reprs"
    return caught.value


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["disks"][0].update(shared=[]), r"\$\.disks\[0\]\.shared"),
        (lambda d: d["disks"][0].update(size="67108864"), r"\$\.disks\[0\]\.size"),
        (lambda d: d["targets"][0].update(luns={"0": 1}), r"\$\.targets\[0\]\.luns"),
        (lambda d: d["targets"][0]["acls"][0].update(chap="secret"), r"\$\.targets\[0\]\.acls\[0\]\.chap"),
        (lambda d: d.update(portals=[{"address": 1, "port": 3260}]), r"\$\.portals\[0\]\.address"),
        (lambda d: d.update(node=[]), r"\$\.node"),
        (lambda d: d.update(version=True), "has no format version"),
        (lambda d: d.pop("version"), "has no format version"),
        (lambda d: d.update(version=[]), "has no format version"),
        (lambda d: d.update(disks=[*d["disks"], d["disks"][0]]), "disk 'd1' more than once"),
    ],
)
def test_import_configuration_names_a_wrong_typed_field(tmp_path, mutate, field):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        document = json.loads(json.dumps(engine.export_configuration()))
        mutate(document)
        await refused(engine, engine.import_configuration(json.dumps(document), force=True), match=field)
        # The object tree's values stay well-typed: the node still exports and re-imports itself.
        await engine.import_configuration(json.dumps(engine.export_configuration()), force=True)

    run(scenario())


@pytest.mark.parametrize("importer", ["import_configuration", "import_targetcli"])
def test_deeply_nested_documents_are_refused(tmp_path, importer):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        for document in ("[" * DEEP + "]" * DEEP, '{"format": "x", "extra": ' + "[" * DEEP + "]" * DEEP + "}"):
            await refused(engine, getattr(engine, importer)(document))

    run(scenario())


def test_a_refused_targetcli_import_leaves_every_file_as_it_was(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        first, second = tmp_path / "first.img", tmp_path / "second.img"
        first.write_bytes(b"first" * 1000 + bytes((1 << 20) - 5000))
        second.write_bytes(bytes(3 << 20))
        document = saveconfig(first, 1 << 20)
        copy = {**document["storage_objects"][0], "name": "second", "dev": str(second), "wwn": ""}
        document["storage_objects"].append(copy)
        # The second file is not the size its backstore exports: refused, and the first
        # file (checked first) gets no trailer either.
        await refused(
            engine, engine.import_targetcli(json.dumps(document)), match="not adopting", files=[first, second]
        )

    run(scenario())


def test_extending_by_less_than_a_trailer_keeps_the_disk_importable(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        disk = engine.config.disks["d1"]
        grown = await engine.extend_disk("d1", disk.size + 512)
        assert diskfile.read_marker(tmp_path / "state" / "disks" / "d1.img") == validation.marker_of(grown)
        await engine.import_configuration(json.dumps(engine.export_configuration()), force=True)

    run(scenario())


def test_an_extend_the_file_system_refuses_leaves_the_file_untouched(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        path = tmp_path / "state" / "disks" / "d1.img"
        # ext4 refuses files of 16 TiB and more with EFBIG; the size itself is valid.
        await refused(engine, engine.extend_disk("d1", 2**62), match="File too large", files=[path])

    run(scenario())


def test_a_disk_imported_under_a_new_name_carries_it_in_its_trailer(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await engine.create_disk("old", 1 << 20, path=str(tmp_path / "vol.img"))
        await engine.delete_disk("old")
        disk = await engine.import_disk(str(tmp_path / "vol.img"), name="new")
        assert diskfile.read_marker(tmp_path / "vol.img") == validation.marker_of(disk)
        await engine.import_configuration(json.dumps(engine.export_configuration()), force=True)
        assert engine.config.disks["new"] == disk

    run(scenario())


def forge(path, trailer: bytes, size=1 << 20):
    path.write_bytes(bytes(size) + trailer.ljust(diskfile.TRAILER_SIZE, b"\0"))


@pytest.mark.parametrize(
    "trailer",
    [
        b'APPLIANCED-DISK\n{"version": 1, "name": "x", "serial": "s", "size": 1}',
        b'APPLIANCED-DISK\n{"version": 1, "name": ["x"], "serial": "s", "size": 1048576}',
        b'APPLIANCED-DISK\n{"version": 1, "name": "x", "serial": "s", "size": "1048576"}',
        b'APPLIANCED-DISK\n{"version": 1, "name": "x\\n", "serial": "s", "size": 1048576}',
        b'APPLIANCED-DISK\n{"version": 1, "name": "x", "serial": "a b\\u0001", "size": 1048576}',
        b'APPLIANCED-DISK\n{"version": 1, "name": "x", "serial": "s"}',
        b'APPLIANCED-DISK\n{"version": 2, "name": "x", "serial": "s", "size": 1048576}',
        b"APPLIANCED-DISK\n" + b"[" * 4000,
    ],
)
def test_forged_trailers_are_refused(tmp_path, trailer):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        path = tmp_path / "forged.img"
        forge(path, trailer, 1 if b'"size": 1,' in trailer else 1 << 20)
        await refused(engine, engine.import_disk(str(path)), files=[path])

    run(scenario())


@pytest.mark.parametrize("kind", ["disk", "target"])
def test_names_with_a_trailing_newline_are_refused(tmp_path, kind):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        call = engine.create_disk("d1\n", 1 << 20) if kind == "disk" else engine.create_target("t1\n")
        await refused(engine, call, match="name")
        assert not any((tmp_path / "state" / "disks").glob("*")), "no file is made for a refused name"

    run(scenario())


def test_boot_profile_names_and_ports_take_ascii_only(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await populate(engine)
        await refused(engine, engine.create_boot_client("pc1\n", "t1", INITIATOR, portal="10.1.0.5"))
        await refused(engine, engine.create_boot_client("pc1", "t1", INITIATOR, portal="10.1.0.5:326\u00b2"))
        await refused(
            engine, engine.create_boot_client("pc1", "t1", INITIATOR, portal="10.1.0.5:\u0663\u0662\u0666\u0660")
        )

    run(scenario())


@pytest.mark.parametrize("size", [2**63 - 512, 2**63 - diskfile.TRAILER_SIZE, 2**64 - 512])
def test_sizes_near_the_limit_are_refused_without_leaving_a_file(tmp_path, size):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        path = tmp_path / "huge.img"
        error = await refused(engine, engine.create_disk("huge", size, path=str(path)), files=[path])
        assert "size" in str(error) or "too large" in str(error)
        assert not path.exists()

    run(scenario())


def test_a_path_component_over_255_bytes_is_refused(tmp_path):
    async def scenario():
        engine = await started(make_engine(tmp_path))
        await refused(engine, engine.create_disk("d1", 1 << 20, path=str(tmp_path / ("x" * 256))), match="too long")
        await refused(engine, engine.import_disk(str(tmp_path / ("é" * 128))), match="too long")

    run(scenario())


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    async def scenario():
        engine = await started(make_engine(tmp_path))
        await refused(engine, engine.import_disk(str(fifo)), match="not a regular file")
        await refused(engine, engine.import_disk("/dev/null"), match="not a regular file")
        await refused(engine, engine.import_disk(str(tmp_path)), match="not a regular file")
        await refused(engine, engine.create_disk("d1", 1 << 20, path=str(fifo)), AlreadyExists)
        # A disk whose file was replaced by a FIFO: extend must refuse, not hang.
        await engine.create_disk("d2", 1 << 20, path=str(tmp_path / "d2.img"))
        (tmp_path / "d2.img").unlink()
        os.mkfifo(tmp_path / "d2.img")
        await refused(engine, engine.extend_disk("d2", 2 << 20), match="not a regular file")
        document = saveconfig(fifo, 1 << 20)
        await refused(engine, engine.import_targetcli(json.dumps(document)), match="not a regular file")

    # A hang is a failure, not a stuck test run.
    done = threading.Event()
    failure = []

    def body():
        try:
            run(scenario())
        except BaseException as exc:  # handed to the test's thread below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=body, daemon=True).start()
    assert done.wait(30), "a call on a special file blocked"
    if failure:
        raise failure[0]


def test_older_and_forged_state_files_give_a_state_error(tmp_path):
    store = StateStore(tmp_path, "state.json")
    for text in ("[" * DEEP, '{"version": 1, "node": {"id": 5}}', '{"version": "1"}', "\xff"):
        store.path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ApplianceError, match=str(store.path)):
            store.load()
    store.path.write_text('{"version": 1, "node": {"id": "n1"}}')
    assert store.load() == Config(node_id="n1")


def test_targetcli_errors_carry_no_python_reprs():
    document = saveconfig("/srv/legacy.img", 1 << 20)
    del document["targets"][0]["wwn"]
    with pytest.raises(ApplianceError) as caught:
        targetcli.convert(json.dumps(document), "iqn.2003-01.org.example")
    assert "KeyError" not in str(caught.value) and "(" not in str(caught.value).split(":")[0]
