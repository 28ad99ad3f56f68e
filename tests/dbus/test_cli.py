"""appliancectl against the real daemon: the first slice, output formats, named errors."""

import json

import pytest

from applianced.iscsi import diskfile
from tests.support.daemon import INITIATOR


def test_first_slice_through_the_cli(daemon, tmp_path):
    backing = tmp_path / "vol.img"
    assert daemon.cli("disk", "create", "d1", "1.5G", "--path", str(backing), "--description", "db").returncode == 0
    assert daemon.cli("target", "create", "t1", "--iqn", "IQN.2001-04.com.Example:T1").returncode == 0
    assert daemon.cli("target", "create", "t2").returncode == 0
    assert daemon.cli("portal", "create", "127.0.0.1", "--port", "3261").returncode == 0
    assert daemon.cli("portal", "create", "::1").returncode == 0
    assert daemon.cli("lun", "add", "t1", "d1", "--lun", "3").returncode == 0
    assert daemon.cli("acl", "add", "t1", INITIATOR).returncode == 0

    disks = daemon.cli("--json", "disk", "list").json()
    assert disks[0] | {"serial": None} == {
        "name": "d1",
        "kind": "file",
        "status": "online",
        "reason": "",
        "size": 1536 * 1024**2,
        "path": str(backing),
        "serial": None,
        "description": "db",
        "shared": False,
        "backstore": "dm",
    }
    assert backing.stat().st_size == 1536 * 1024**2 + diskfile.TRAILER_SIZE
    targets = {t["name"]: t for t in daemon.cli("--json", "target", "list").json()}
    assert targets["t1"]["iqn"] == "iqn.2001-04.com.example:t1"
    assert targets["t2"]["iqn"] == "iqn.2003-01.org.linux-iscsi.applianced:t2"
    assert (targets["t1"]["luns"], targets["t1"]["acls"]) == (1, 1)
    assert daemon.cli("--json", "lun", "list", "t1").json() == [
        {"target": "t1", "lun": 3, "disk": "d1", "read_only": False}
    ]
    assert daemon.cli("--json", "acl", "list").json() == [{"target": "t1", "initiator": INITIATOR, "auth": "inherited"}]
    assert sorted((p["address"], p["port"]) for p in daemon.cli("--json", "portal", "list").json()) == [
        ("127.0.0.1", 3261),
        ("::1", 3260),
    ]

    table = daemon.cli("disk", "list").stdout.splitlines()
    columns = ["NAME", "KIND", "STATUS", "SIZE", "PATH", "SERIAL", "SHARED", "BACKSTORE", "DESCRIPTION", "REASON"]
    assert table[0].split() == columns
    assert table[1].split()[:5] == ["d1", "file", "online", "1.50", "GiB"]

    for args in (
        ("acl", "remove", "t1", INITIATOR),
        ("lun", "remove", "t1", "3"),
        ("target", "delete", "t1"),
        ("portal", "delete", "[::1]"),
        ("disk", "delete", "d1"),
    ):
        assert daemon.cli(*args).returncode == 0, args
    assert daemon.cli("--json", "disk", "list").json() == []
    assert backing.exists(), "deleting a disk keeps its file unless asked"


@pytest.mark.parametrize(
    ("args", "code", "sentence"),
    [
        (("disk", "create", "d1", "64M"), 4, "already exists: disk 'd1' exists already"),
        (("disk", "create", "d2", "lots"), 5, "invalid argument: size 'lots' is not a number"),
        (("disk", "create", "d2", "100K"), 5, "invalid argument: size 102400 is out of range"),
        (("disk", "create", "bad/name", "1M"), 5, "invalid argument: disk name 'bad/name' is invalid"),
        (("disk", "create", "d2", "1M", "--path", "rel.img"), 5, "must be absolute"),
        (("disk", "delete", "d1"), 6, "busy: disk 'd1' is exported by target(s) t1"),
        (("disk", "delete", "nope"), 3, "not found: disk 'nope' does not exist"),
        (("target", "create", "t2", "--iqn", "iqn.20-01.x"), 5, "invalid argument: target IQN 'iqn.20-01.x'"),
        (("target", "create", "t1"), 4, "already exists: target 't1' exists already"),
        (("acl", "add", "t1", "client1"), 5, "must start with 'iqn.', 'eui.' or 'naa.'"),
        (("acl", "add", "t1", INITIATOR), 4, "is already allowed on target 't1'"),
        (("lun", "add", "t1", "d1"), 4, "already exists: target 't1' exports disk 'd1' already"),
        (("disk", "modify", "nope", "--shared"), 3, "not found: disk 'nope' does not exist"),
        (("lun", "add", "t1", "d1", "--lun", "-1"), 5, "invalid argument: LUN -1 is negative"),
        (("lun", "remove", "t1", "9"), 3, "not found: LUN"),
        (("portal", "create", "198.51.100.7"), 5, "is not configured on any interface of this node"),
        (("portal", "create", "127.0.0.1", "--port", "70000"), 5, "port 70000 is out of range"),
        (("portal", "create", "localhost"), 5, "'localhost' is not an IPv4 or IPv6 address"),
        (("portal", "create", "127.0.0.1"), 4, "already exists: portal 127.0.0.1:3260"),
    ],
)
def test_named_errors_are_one_sentence_and_change_nothing(daemon, args, code, sentence):
    daemon.configure_first_slice()
    state = (daemon.state_dir / "state.json").read_bytes()
    kernel = daemon.kernel_file.read_bytes()
    files = sorted(daemon.state_dir.rglob("*"))

    result = daemon.cli(*args)
    assert result.returncode == code
    assert sentence in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert (daemon.state_dir / "state.json").read_bytes() == state
    assert daemon.kernel_file.read_bytes() == kernel
    assert sorted(daemon.state_dir.rglob("*")) == files


def test_cli_says_when_the_daemon_is_not_running(daemon):
    daemon.stop()
    result = daemon.cli("disk", "list")
    assert result.returncode == 12
    assert "applianced is not running" in result.stderr


def test_target_modify(daemon):
    daemon.configure_first_slice()
    assert daemon.cli("target", "modify", "t1", "--alias", "Mail store", "--description", "mail").returncode == 0
    (target,) = daemon.cli("--json", "target", "list").json()
    assert (target["alias"], target["description"]) == ("Mail store", "mail")
    assert daemon.cli("target", "modify", "t1", "--disable").returncode == 0
    assert daemon.cli("--json", "target", "list").json()[0]["enabled"] is False
    assert daemon.cli("target", "modify", "t1", "--iqn", "iqn.2026-11.com.example:mail", "--enable").returncode == 0
    (target,) = daemon.cli("--json", "target", "list").json()
    assert (target["iqn"], target["enabled"]) == ("iqn.2026-11.com.example:mail", True)
    assert "iqn.2026-11.com.example:mail" in daemon.kernel_file.read_text()
    nothing = daemon.cli("target", "modify", "t1")
    assert (nothing.returncode, "nothing to change" in nothing.stderr) == (5, True)


def test_chap_through_the_cli_keeps_secrets_private(daemon):
    daemon.configure_first_slice()
    secret, mutual = "s3cret-s3cret", "m-s3cret-s3cr"
    assert daemon.cli("chap", "target", "t1", "--mutual", input=f"{secret}\n{mutual}\n").returncode == 0
    assert daemon.cli("--json", "target", "list").json()[0]["auth"] == "mutual-chap"
    assert daemon.cli("chap", "acl", "t1", INITIATOR, "--user", "alice", input="alice-secret1\n").returncode == 0
    assert daemon.cli("--json", "acl", "list").json()[0]["auth"] == "chap"
    assert daemon.cli("chap", "discovery", "--user", "disco", input=f"{secret}\n").returncode == 0
    assert daemon.cli("status").returncode == 0

    # Secrets are in the 0600 state file and in the kernel, nowhere a reader can see.
    state = (daemon.state_dir / "state.json").read_text()
    assert secret in state and "alice-secret1" in state
    for args in (("--json", "target", "list"), ("--json", "acl", "list"), ("--json", "disk", "list")):
        assert secret not in daemon.cli(*args).stdout
    assert secret not in daemon.log_text() and "alice-secret1" not in daemon.log_text()

    refused = daemon.cli("chap", "target", "t1", input="short\n")
    assert (refused.returncode, "12 to 16" in refused.stderr, "short" in refused.stderr) == (5, True, False)
    same = daemon.cli("chap", "target", "t1", "--mutual", input=f"{secret}\n{secret}\n")
    assert (same.returncode, "must differ" in same.stderr) == (5, True)
    assert daemon.cli("chap", "target", "t1", "--off").returncode == 0
    assert daemon.cli("--json", "target", "list").json()[0]["auth"] == "none"
    missing = daemon.cli("chap", "target", "t1")
    assert (missing.returncode, "standard input" in missing.stderr) == (5, True)


def test_boot_profile_prints_dhcp_settings(daemon):
    daemon.configure_first_slice()
    # A documentation address: the profile is only text for a DHCP server, nothing is sent.
    created = daemon.cli(
        "boot", "create", "pc1", "t1", INITIATOR, "--mac", "00-15-17-0B-0E-F6", "--portal", "192.0.2.10"
    )
    assert created.returncode == 0, created.stderr
    iqn = daemon.cli("--json", "target", "list").json()[0]["iqn"]
    (profile,) = daemon.cli("--json", "boot", "list").json()
    assert profile["root_path"] == f"iscsi:192.0.2.10:6:3260:0:{iqn}"
    assert daemon.cli("boot", "show", "pc1", "--format", "root-path").stdout.strip() == profile["root_path"]
    everything = daemon.cli("boot", "show", "pc1").stdout
    for marker in ("# --- isc-dhcpd ---", "# --- kea ---", "# --- dnsmasq ---", "201", "203", INITIATOR):
        assert marker in everything
    refused = daemon.cli("boot", "create", "pc2", "t1", INITIATOR, "--lun", "255", "--portal", "192.0.2.10")
    assert (refused.returncode, "255" in refused.stderr) == (5, True)
    busy = daemon.cli("lun", "remove", "t1", "0", "--force")
    assert (busy.returncode, "pc1" in busy.stderr) == (6, True)
    assert daemon.cli("boot", "delete", "pc1").returncode == 0
    assert daemon.cli("--json", "boot", "list").json() == []


def test_boot_profile_chap_is_shown_only_to_root(daemon):
    daemon.configure_first_slice()
    secret = "b00t-s3cret-1"
    assert daemon.cli("chap", "acl", "t1", INITIATOR, input=f"{secret}\n").returncode == 0
    refused = daemon.cli("boot", "create", "pc1", "t1", INITIATOR, "--firmware", "uefi", "--portal", "192.0.2.10")
    assert (refused.returncode, "MAC" in refused.stderr) == (5, True)
    created = daemon.cli(
        "boot",
        "create",
        "pc1",
        "t1",
        INITIATOR,
        "--firmware",
        "ipxe",
        "--mac",
        "52:54:00:12:34:56",
        "--portal",
        "192.0.2.10",
    )
    assert created.returncode == 0, created.stderr
    assert daemon.cli("--json", "boot", "list").json()[0]["firmware"] == "ipxe"
    for user in (None, "65534"):
        public = daemon.cli("boot", "show", "pc1", "--format", "dnsmasq", user=user)
        assert public.returncode == 0 and "dhcp-userclass=" in public.stdout and ",203," in public.stdout
        assert secret not in public.stdout and "--secrets" in public.stdout
    full = daemon.cli("boot", "show", "pc1", "--format", "dnsmasq", "--secrets")
    assert full.returncode == 0 and f'encap:175,191,"{secret}"' in full.stdout
    denied = daemon.cli("boot", "show", "pc1", "--secrets", user="65534")
    assert (denied.returncode, secret in denied.stdout + denied.stderr) == (11, False)
    assert secret not in daemon.log_text()


def test_config_export_is_private_and_imports_back(daemon, tmp_path):
    daemon.configure_first_slice()
    assert daemon.cli("chap", "target", "t1", input="s3cret-s3cret\n").returncode == 0
    export = tmp_path / "export.json"
    assert daemon.cli("config", "export", "--output", str(export)).returncode == 0
    assert export.stat().st_mode & 0o777 == 0o600
    assert "s3cret-s3cret" in export.read_text()
    denied = daemon.cli("config", "export", user="65534")
    assert (denied.returncode, denied.stdout) == (11, "")
    assert daemon.cli("target", "delete", "t1").returncode == 0
    assert daemon.cli("config", "import", str(export)).returncode == 0
    assert [t["auth"] for t in daemon.cli("--json", "target", "list").json()] == ["chap"]
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{}")
    refused = daemon.cli("config", "import", str(garbage))
    assert (refused.returncode, "not an applianced configuration" in refused.stderr) == (5, True)


def test_portal_for_some_targets(daemon):
    daemon.configure_first_slice()
    assert daemon.cli("target", "create", "t2").returncode == 0
    assert daemon.cli("portal", "create", "127.0.0.1", "--port", "3261", "--target", "t2").returncode == 0
    listed = {(p["port"], p["targets"]) for p in daemon.cli("--json", "portal", "list").json()}
    assert listed == {(3260, "(all)"), (3261, "t2")}
    unknown = daemon.cli("portal", "create", "127.0.0.1", "--port", "3262", "--target", "nope")
    assert unknown.returncode == 3


def test_sessions_show_portal_authentication_and_luns(daemon):
    daemon.configure_first_slice()
    daemon.cli("chap", "acl", "t1", INITIATOR, input="s3cret-s3cret\n")
    (target,) = daemon.cli("--json", "target", "list").json()
    daemon.stop()
    kernel = json.loads(daemon.kernel_file.read_text())
    kernel["sessions"] = [
        {
            "target_iqn": target["iqn"],
            "initiator": INITIATOR,
            "state": "LOGGED_IN",
            "addresses": ["10.1.0.9"],
            "isid": "00023d000002",
            "tsih": 2,
            "portals": ["10.1.0.1:3260"],
        }
    ]
    daemon.kernel_file.write_text(json.dumps(kernel))
    daemon.start()
    assert daemon.cli("--json", "target", "sessions", "t1").json() == [
        {
            "initiator": INITIATOR,
            "state": "LOGGED_IN",
            "addresses": "10.1.0.9",
            "portals": "10.1.0.1:3260",
            "authentication": "chap",
            "luns": "0",
            "isid": "00023d000002",
            # Nothing was logged about its login (the fake kernel's log is empty).
            "header-digest": "-",
            "data-digest": "-",
            "negotiated": {},
        }
    ]
    assert daemon.cli("--json", "target", "list").json()[0]["status"] == "logged in (1)"


BATCH = f"""
# the usual first configuration, in one start of appliancectl
disk create d1 16M
target create t1
portal create 127.0.0.1 --port 3261
lun add t1 d1
acl add t1 {INITIATOR}   # comments may follow a command
--json lun list t1
"""


def test_batch_runs_lines_in_order_over_one_connection(daemon, tmp_path):
    script = tmp_path / "setup.txt"
    script.write_text(BATCH)
    done = daemon.cli("batch", str(script))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"target": "t1", "lun": 0, "disk": "d1", "read_only": False}]
    assert daemon.cli("--json", "acl", "list").json() == [{"target": "t1", "initiator": INITIATOR, "auth": "inherited"}]

    # From standard input too; the first failing line stops the batch and is named.
    done = daemon.cli("batch", input="target create t2\ntarget create t1\ntarget create t3\n")
    assert done.returncode == 4
    assert done.stderr == "appliancectl: line 2: already exists: target 't1' exists already\n"
    assert sorted(t["name"] for t in daemon.cli("--json", "target", "list").json()) == ["t1", "t2"]


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("target create t9\ntarget crate t8\n", "line 2 is not a command"),
        ("target create t9\ndisk create d9 'unbalanced\n", "line 2: No closing quotation"),
        ("target create t9\nbatch other.txt\n", "line 2: a batch cannot run a batch"),
    ],
)
def test_a_batch_with_a_bad_line_runs_nothing(daemon, text, sentence):
    done = daemon.cli("batch", "-", input=text)
    assert done.returncode == 5
    assert sentence in done.stderr
    assert daemon.cli("--json", "target", "list").json() == []
