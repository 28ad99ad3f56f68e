"""iSCSI boot profiles: RFC 4173 root paths and the ISC dhcpd, Kea and dnsmasq snippets."""

import json
import re
import shutil
import subprocess

import pytest

from applianced.errors import InvalidArgument
from applianced.iscsi.bootprofile import (
    BootProfile,
    BootTarget,
    client_groups,
    dnsmasq,
    isc_dhcpd,
    kea,
    root_path,
    vendor_suboptions,
)
from applianced.state import Chap

TARGET_IQN = "iqn.2003-01.org.example.san:boot-client1"
INITIATOR_IQN = "iqn.1995-05.com.broadcom.00.11.22.33.44.55.iscsiboot"
MAC = "00:11:22:33:44:55"
PRIMARY_PATH = f"iscsi:192.0.2.10:6:3260:40:{TARGET_IQN}"
SECONDARY_PATH = f"iscsi:192.0.2.11:6:3260:40:{TARGET_IQN}"
# The secret has every character the snippets must escape or keep inside quotes.
CHAP = Chap(INITIATOR_IQN, 's3cret"s#3,c\\', TARGET_IQN, "mutual-s3cret!")


def one_target(**overrides):
    fields = {
        "name": "client1",
        "initiator_iqn": INITIATOR_IQN,
        "primary": BootTarget("192.0.2.10", TARGET_IQN, lun=64),
        "mac": MAC,
    }
    fields.update(overrides)
    return BootProfile(**fields)


def two_targets(**overrides):
    overrides.setdefault("secondary", BootTarget("192.0.2.11", TARGET_IQN, lun=64))
    return one_target(**overrides)


# Root paths (RFC 4173)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (BootTarget("192.0.2.10", TARGET_IQN), f"iscsi:192.0.2.10:6:3260:0:{TARGET_IQN}"),
        (BootTarget("192.0.2.10", TARGET_IQN, lun=64), PRIMARY_PATH),
        (BootTarget("192.0.2.10", TARGET_IQN, port=3261, lun=10), f"iscsi:192.0.2.10:6:3261:A:{TARGET_IQN}"),
        (BootTarget("192.0.2.10", TARGET_IQN, lun=254), f"iscsi:192.0.2.10:6:3260:FE:{TARGET_IQN}"),
        (BootTarget("2001:db8::1", TARGET_IQN), f"iscsi:[2001:db8::1]:6:3260:0:{TARGET_IQN}"),
        (BootTarget("2001:DB8:0:0::1", TARGET_IQN, lun=64), f"iscsi:[2001:db8::1]:6:3260:40:{TARGET_IQN}"),
    ],
)
def test_root_path(target, expected):
    assert root_path(target) == expected


def test_lun_defaults_to_0_and_port_to_3260():
    target = BootTarget("192.0.2.10", TARGET_IQN)
    assert (target.lun, target.port) == (0, 3260)


def test_every_boot_lun_is_written_in_hex():
    for lun in range(255):
        lun_field = root_path(BootTarget("192.0.2.10", TARGET_IQN, lun=lun)).split(":")[4]
        assert int(lun_field, 16) == lun


def test_target_iqn_is_written_in_canonical_lower_case():
    assert root_path(BootTarget("192.0.2.10", "IQN.2003-01.ORG.Example:Boot")).endswith(":iqn.2003-01.org.example:boot")


@pytest.mark.parametrize("lun", [255, -1, 256, 1.0, True, "0"])
def test_bad_luns_are_refused(lun):
    with pytest.raises(InvalidArgument, match="LUN"):
        BootTarget("192.0.2.10", TARGET_IQN, lun=lun)


def test_lun_255_is_refused_with_the_reason():
    with pytest.raises(InvalidArgument, match="Microsoft"):
        BootTarget("192.0.2.10", TARGET_IQN, lun=255)


@pytest.mark.parametrize("port", [0, 65536, -1, True, "3260"])
def test_bad_ports_are_refused(port):
    with pytest.raises(InvalidArgument, match="port"):
        BootTarget("192.0.2.10", TARGET_IQN, port=port)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "san.example.com",
        "192.0.2",
        "192.0.2.300",
        "010.0.0.1",
        "0.0.0.0",
        "::",
        "127.0.0.1",
        "::1",
        "224.0.0.1",
        "fe80::1%eth0",
        None,
    ],
)
def test_bad_addresses_are_refused(address):
    with pytest.raises(InvalidArgument, match="address"):
        BootTarget(address, TARGET_IQN)


@pytest.mark.parametrize("iqn", ["", "   ", "not-an-iqn", "iqn.2003-01.org.example:has space"])
def test_bad_target_iqns_are_refused(iqn):
    with pytest.raises(InvalidArgument, match="target IQN"):
        BootTarget("192.0.2.10", iqn)


# Profiles


def test_profile_normalizes_mac_and_initiator():
    profile = one_target(mac="00-11-22-AA-BB-CC", initiator_iqn="IQN.1991-05.com.Microsoft:Host1")
    assert profile.mac == "00:11:22:aa:bb:cc"
    assert profile.initiator_iqn == "iqn.1991-05.com.microsoft:host1"
    assert profile.vendor_id == "BRCM ISAN"
    assert profile.secondary is None


@pytest.mark.parametrize(
    "mac",
    [
        "",
        "00:11:22:33:44",
        "00:11:22:33:44:55:66",
        "00:11-22:33:44:55",
        "0011.2233.4455",
        "gg:11:22:33:44:55",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
    ],
)
def test_bad_macs_are_refused(mac):
    with pytest.raises(InvalidArgument, match="MAC"):
        one_target(mac=mac)


@pytest.mark.parametrize("name", ["", "-client", "client-", "client_1", "client.1", "a" * 64, "client 1"])
def test_bad_profile_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="profile name"):
        one_target(name=name)


@pytest.mark.parametrize(
    "vendor_id",
    [
        "",
        " BRCM",
        "BRCM ",
        "BRCM'ISAN",
        'BRCM"ISAN',
        "BRCM,ISAN",
        "BRCM#1",
        "BRCM\\ISAN",
        "BRCM\tISAN",
        "BRCMé",
        "x" * 256,
    ],
)
def test_bad_vendor_ids_are_refused(vendor_id):
    with pytest.raises(InvalidArgument, match="vendor ID"):
        one_target(vendor_id=vendor_id)


def test_bad_initiator_iqn_is_refused():
    with pytest.raises(InvalidArgument, match="initiator IQN"):
        one_target(initiator_iqn="")


def test_second_target_equal_to_the_first_is_refused():
    with pytest.raises(InvalidArgument, match="same as the first"):
        two_targets(secondary=BootTarget("192.0.2.10", TARGET_IQN, lun=64))


def test_vendor_suboptions():
    assert vendor_suboptions(one_target()) == [(201, PRIMARY_PATH), (203, INITIATOR_IQN)]
    assert vendor_suboptions(two_targets()) == [(201, PRIMARY_PATH), (202, SECONDARY_PATH), (203, INITIATOR_IQN)]


RENDERERS = [isc_dhcpd, kea, dnsmasq]


@pytest.mark.parametrize("render", RENDERERS)
def test_ipv6_portals_are_refused_in_dhcpv4_snippets(render):
    with pytest.raises(InvalidArgument, match="IPv6"):
        render(one_target(primary=BootTarget("2001:db8::1", TARGET_IQN)))
    with pytest.raises(InvalidArgument, match="IPv6"):
        render(two_targets(secondary=BootTarget("2001:db8::2", TARGET_IQN)))


@pytest.mark.parametrize("render", RENDERERS)
def test_options_longer_than_255_bytes_are_refused(render):
    long_iqn = "iqn.2003-01.org.example:" + "x" * 199
    with pytest.raises(InvalidArgument, match="at most 255"):
        render(one_target(primary=BootTarget("192.0.2.10", long_iqn)))
    medium_iqn = "iqn.2003-01.org.example:" + "x" * 60
    profile = two_targets(primary=BootTarget("192.0.2.10", medium_iqn), secondary=BootTarget("192.0.2.11", medium_iqn))
    with pytest.raises(InvalidArgument, match="option 43"):
        render(profile)


# Firmware families and the groups of options each one reads


def option_codes(group):
    return [(option.space, option.code) for option in group.options]


def test_every_firmware_is_served_to_the_mac_by_default():
    main, broadcom = client_groups(one_target(chap=CHAP))
    assert (main.family, main.vendor_class, main.user_class) == ("", "", "")
    # Option 17 for every firmware, 203 and the option 175 credentials for iPXE.
    assert option_codes(main) == [(0, 17), (0, 203), (175, 190), (175, 191), (175, 192), (175, 193)]
    assert [option.value for option in main.options] == [
        PRIMARY_PATH,
        INITIATOR_IQN,
        CHAP.user,
        CHAP.secret,
        CHAP.mutual_user,
        CHAP.mutual_secret,
    ]
    assert [option.credential for option in main.options] == [False, False, True, True, True, True]
    # Option 43 means something else to every vendor: Broadcom's only for its class.
    assert (broadcom.family, broadcom.vendor_class) == ("broadcom", "BRCM ISAN")
    assert option_codes(broadcom) == [(43, 201), (43, 203)]


def test_one_way_chap_sends_no_reverse_credentials():
    (main, _) = client_groups(one_target(chap=Chap(INITIATOR_IQN, "s3cret-s3cret")))
    assert option_codes(main) == [(0, 17), (0, 203), (175, 190), (175, 191)]


def test_without_a_mac_each_family_is_told_by_its_class():
    ipxe, broadcom = client_groups(two_targets(mac=None))
    assert (ipxe.family, ipxe.user_class, ipxe.vendor_class) == ("ipxe", "iPXE", "")
    assert option_codes(ipxe) == [(0, 17), (0, 203)]
    assert option_codes(broadcom) == [(0, 17), (43, 201), (43, 202), (43, 203)]


@pytest.mark.parametrize(
    ("firmware", "expected"),
    [
        ("ipxe", [("ipxe", "iPXE", "", [(0, 17), (0, 203)])]),
        ("uefi", [("", "", "", [(0, 17)])]),
        ("broadcom", [("broadcom", "", "BRCM ISAN", [(0, 17), (43, 201), (43, 203)])]),
    ],
)
def test_a_profile_limited_to_one_firmware(firmware, expected):
    groups = client_groups(one_target(firmware=firmware))
    assert [(g.family, g.user_class, g.vendor_class, option_codes(g)) for g in groups] == expected


def test_uefi_needs_a_mac():
    with pytest.raises(InvalidArgument, match="MAC"):
        one_target(firmware="uefi", mac=None)


@pytest.mark.parametrize("firmware", ["", "UEFI", "bios", None, "ipxe "])
def test_unknown_firmware_is_refused(firmware):
    with pytest.raises(InvalidArgument, match="firmware"):
        one_target(firmware=firmware)


def test_credentials_are_left_out_unless_asked_for():
    profile = one_target(chap=CHAP)
    for render in RENDERERS:
        hidden, shown = render(profile), render(profile, secrets=True)
        for value in (CHAP.secret, CHAP.mutual_secret):
            assert value not in hidden and "\\" not in hidden
        assert "--secrets" in hidden and "--secrets" not in shown
        assert "mutual-s3cret!" in shown
    assert "--secrets" not in dnsmasq(one_target())


def test_ipxe_credentials_must_fit_option_175():
    long_user = Chap("u" * 200, "s3cret-s3cret", "m" * 40, "mutual-s3cret!")
    with pytest.raises(InvalidArgument, match="option 175"):
        isc_dhcpd(one_target(chap=long_user))


# ISC dhcpd


def test_isc_dhcpd_one_target():
    text = isc_dhcpd(one_target(chap=CHAP), secrets=True)
    assert "option space iscsi-boot;" in text
    assert "option iscsi-boot.first-target code 201 = text;" in text
    assert "option iscsi-boot.second-target code 202 = text;" in text
    assert "option iscsi-boot.initiator-name code 203 = text;" in text
    assert "option iscsi-initiator-iqn code 203 = string;" in text
    assert "option space ipxe;" in text
    assert "option ipxe.username code 190 = string;" in text
    assert "option ipxe.reverse-password code 193 = string;" in text
    assert "option ipxe-encap-opts code 175 = encapsulate ipxe;" in text
    assert 'class "iscsi-boot-client1" {' in text
    assert f"match if hardware = 1:{MAC};" in text
    assert "concat(option dhcp-parameter-request-list, 11, af, cb)" in text
    assert f'option root-path "{PRIMARY_PATH}";' in text
    assert f'option iscsi-initiator-iqn "{INITIATOR_IQN}";' in text
    assert 'option ipxe.password "s3cret\\"s#3,c\\\\";' in text
    assert f'option ipxe.reverse-username "{CHAP.mutual_user}";' in text
    assert 'class "iscsi-boot-client1-broadcom" {' in text
    assert f'match if option vendor-class-identifier = "BRCM ISAN" and hardware = 1:{MAC};' in text
    assert "concat(option dhcp-parameter-request-list, 2b)" in text
    assert "vendor-option-space iscsi-boot;" in text
    assert f'option iscsi-boot.first-target "{PRIMARY_PATH}";' in text
    assert f'option iscsi-boot.initiator-name "{INITIATOR_IQN}";' in text
    assert 'option iscsi-boot.second-target "' not in text
    assert text.count("{") == text.count("}")


def test_isc_dhcpd_two_targets_and_no_mac():
    text = isc_dhcpd(two_targets(mac=None, vendor_id="ACME BOOT"))
    assert 'match if option vendor-class-identifier = "ACME BOOT";' in text
    assert 'match if option user-class = "iPXE";' in text
    assert "hardware" not in text
    assert f'option iscsi-boot.first-target "{PRIMARY_PATH}";' in text
    assert f'option iscsi-boot.second-target "{SECONDARY_PATH}";' in text
    assert text.count(f'option root-path "{PRIMARY_PATH}";') == 2


def test_isc_dhcpd_without_definitions():
    text = isc_dhcpd(one_target(), definitions=False)
    assert "option space" not in text
    assert " code " not in text
    assert f'option iscsi-boot.first-target "{PRIMARY_PATH}";' in text


def test_every_isc_dhcpd_value_is_quoted():
    for line in isc_dhcpd(two_targets(chap=CHAP), secrets=True).splitlines():
        if re.match(r"\s*option (root-path|iscsi-\S+|ipxe\.\S+) (?!code)", line):
            assert re.search(r' "([^"\\]|\\.)+";$', line), line


# Kea


def test_kea_one_target():
    fragment = json.loads(kea(one_target(chap=CHAP), secrets=True))
    assert set(fragment) == {"option-def", "client-classes"}
    definitions = {(item.get("space", "dhcp4"), item["code"]): item for item in fragment["option-def"]}
    assert definitions[("dhcp4", 203)] == {"name": "iscsi-initiator-iqn", "code": 203, "type": "string"}
    assert definitions[("dhcp4", 175)] == {
        "name": "ipxe-encap-opts",
        "code": 175,
        "type": "empty",
        "encapsulate": "ipxe",
    }
    assert {code: item["name"] for (space, code), item in definitions.items() if space == "ipxe"} == {
        190: "username",
        191: "password",
        192: "reverse-username",
        193: "reverse-password",
    }
    assert definitions[("vendor-encapsulated-options-space", 201)] == {
        "name": "iscsi-boot-first-target",
        "code": 201,
        "space": "vendor-encapsulated-options-space",
        "type": "string",
    }
    main, broadcom = fragment["client-classes"]
    assert main["name"] == "iscsi-boot-client1"
    assert main["test"] == "pkt4.mac == 0x001122334455"
    assert main["option-data"][:3] == [
        {"name": "root-path", "code": 17, "data": PRIMARY_PATH, "always-send": True},
        {"name": "iscsi-initiator-iqn", "code": 203, "data": INITIATOR_IQN, "always-send": True},
        {"name": "ipxe-encap-opts", "code": 175, "always-send": True},
    ]
    credentials = {item["code"]: item["data"] for item in main["option-data"] if item.get("space") == "ipxe"}
    # Kea splits data at unescaped commas.
    assert credentials == {190: CHAP.user, 191: 's3cret"s#3\\,c\\', 192: CHAP.mutual_user, 193: CHAP.mutual_secret}
    assert broadcom["name"] == "iscsi-boot-client1-broadcom"
    assert broadcom["test"] == "option[60].text == 'BRCM ISAN' and pkt4.mac == 0x001122334455"
    assert broadcom["option-data"] == [
        {"name": "vendor-encapsulated-options", "code": 43, "always-send": True},
        {
            "name": "iscsi-boot-first-target",
            "code": 201,
            "space": "vendor-encapsulated-options-space",
            "data": PRIMARY_PATH,
        },
        {
            "name": "iscsi-boot-initiator-name",
            "code": 203,
            "space": "vendor-encapsulated-options-space",
            "data": INITIATOR_IQN,
        },
    ]


def test_kea_two_targets_and_no_mac():
    fragment = json.loads(kea(two_targets(mac=None)))
    ipxe, broadcom = fragment["client-classes"]
    assert ipxe["test"] == "option[77].hex == 'iPXE'"
    assert broadcom["test"] == "option[60].text == 'BRCM ISAN'"
    suboptions = {item["code"]: item["data"] for item in broadcom["option-data"] if "space" in item}
    assert suboptions == {201: PRIMARY_PATH, 202: SECONDARY_PATH, 203: INITIATOR_IQN}


def test_kea_without_definitions():
    assert set(json.loads(kea(one_target(), definitions=False))) == {"client-classes"}


def test_kea_says_which_class_left_credentials_out():
    main, broadcom = json.loads(kea(one_target(chap=CHAP)))["client-classes"]
    assert "--secrets" in main["comment"] and "comment" not in broadcom


# dnsmasq


def test_dnsmasq_one_target():
    lines = dnsmasq(one_target(chap=CHAP), secrets=True).splitlines()
    mac_tag = "tag:iscsi-boot-client1-mac"
    assert lines[1:] == [
        f"dhcp-mac=set:iscsi-boot-client1-mac,{MAC}",
        f'dhcp-option-force={mac_tag},17,"{PRIMARY_PATH}"',
        f'dhcp-option-force={mac_tag},203,"{INITIATOR_IQN}"',
        f'dhcp-option-force={mac_tag},encap:175,190,"{CHAP.user}"',
        f'dhcp-option-force={mac_tag},encap:175,191,"s3cret\\"s#3,c\\\\"',
        f'dhcp-option-force={mac_tag},encap:175,192,"{CHAP.mutual_user}"',
        f'dhcp-option-force={mac_tag},encap:175,193,"{CHAP.mutual_secret}"',
        "dhcp-vendorclass=set:iscsi-boot-client1-broadcom,BRCM ISAN",
        f'dhcp-option-force={mac_tag},tag:iscsi-boot-client1-broadcom,vendor:BRCM ISAN,201,"{PRIMARY_PATH}"',
        f'dhcp-option-force={mac_tag},tag:iscsi-boot-client1-broadcom,vendor:BRCM ISAN,203,"{INITIATOR_IQN}"',
    ]
    assert lines[0].startswith("#")


def test_dnsmasq_two_targets_and_no_mac():
    text = dnsmasq(two_targets(mac=None))
    assert "dhcp-mac" not in text
    assert "dhcp-userclass=set:iscsi-boot-client1-ipxe,iPXE" in text
    assert f'dhcp-option-force=tag:iscsi-boot-client1-ipxe,17,"{PRIMARY_PATH}"' in text
    assert f'dhcp-option-force=tag:iscsi-boot-client1-broadcom,17,"{PRIMARY_PATH}"' in text
    assert f'dhcp-option-force=tag:iscsi-boot-client1-broadcom,vendor:BRCM ISAN,202,"{SECONDARY_PATH}"' in text
    assert len([line for line in text.splitlines() if line.startswith("dhcp-option-force=")]) == 6


def test_dnsmasq_uefi_profile_is_the_root_path_for_the_mac():
    lines = dnsmasq(one_target(firmware="uefi")).splitlines()
    assert lines[1:] == [
        f"dhcp-mac=set:iscsi-boot-client1-mac,{MAC}",
        f'dhcp-option-force=tag:iscsi-boot-client1-mac,17,"{PRIMARY_PATH}"',
    ]


# The real servers' configuration checks. They only parse the file: no server is started and
# nothing is sent on the network.

TOOLS = {
    "dhcpd": "isc-dhcp-server",
    "kea-dhcp4": "kea-dhcp4-server",
    "dnsmasq": "dnsmasq-base",
}


def require_tool(name):
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: install the Debian package {TOOLS[name]} to check generated configs")
    return path


def run_check(argv):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


PROFILES = [
    one_target(chap=CHAP),
    two_targets(name="client2", mac="00:11:22:33:44:56"),
    two_targets(name="client3", mac=None, vendor_id="ACME BOOT", chap=CHAP),
    one_target(name="client4", firmware="ipxe", chap=Chap(INITIATOR_IQN, "s3cret-s3cret")),
    one_target(name="client5", firmware="uefi"),
    one_target(name="client6", firmware="broadcom"),
]


@pytest.mark.parametrize("secrets", [False, True])
def test_dhcpd_accepts_the_snippets(tmp_path, secrets):
    dhcpd = require_tool("dhcpd")
    config = tmp_path / "dhcpd.conf"
    # Definitions are repeated on purpose: pasted snippets must stay valid together.
    config.write_text("".join(isc_dhcpd(profile, secrets=secrets) for profile in PROFILES))
    run_check([dhcpd, "-t", "-4", "-cf", str(config), "-lf", str(tmp_path / "leases")])


def test_dhcpd_check_rejects_a_broken_snippet(tmp_path):
    dhcpd = require_tool("dhcpd")
    config = tmp_path / "dhcpd.conf"
    config.write_text(isc_dhcpd(one_target()).replace("text;", "txet;", 1))
    result = subprocess.run([dhcpd, "-t", "-4", "-cf", str(config)], capture_output=True, timeout=60, check=False)
    assert result.returncode != 0


@pytest.mark.parametrize("secrets", [False, True])
def test_kea_accepts_the_snippets(tmp_path, secrets):
    kea_dhcp4 = require_tool("kea-dhcp4")
    dhcp4 = {
        "interfaces-config": {"interfaces": []},
        "lease-database": {"type": "memfile", "persist": False},
        "option-def": [],
        "client-classes": [],
    }
    for index, profile in enumerate(PROFILES):
        fragment = json.loads(kea(profile, definitions=index == 0, secrets=secrets))
        dhcp4["option-def"] += fragment.get("option-def", [])
        dhcp4["client-classes"] += fragment["client-classes"]
    config = tmp_path / "kea-dhcp4.json"
    config.write_text(json.dumps({"Dhcp4": dhcp4}))
    run_check([kea_dhcp4, "-t", str(config)])


def test_kea_check_rejects_repeated_definitions(tmp_path):
    kea_dhcp4 = require_tool("kea-dhcp4")
    first, second = (json.loads(kea(profile)) for profile in PROFILES[:2])
    dhcp4 = {
        "interfaces-config": {"interfaces": []},
        "lease-database": {"type": "memfile", "persist": False},
        "option-def": first["option-def"] + second["option-def"],
        "client-classes": first["client-classes"] + second["client-classes"],
    }
    config = tmp_path / "kea-dhcp4.json"
    config.write_text(json.dumps({"Dhcp4": dhcp4}))
    result = subprocess.run([kea_dhcp4, "-t", str(config)], capture_output=True, timeout=60, check=False)
    assert result.returncode != 0


@pytest.mark.parametrize("secrets", [False, True])
def test_dnsmasq_accepts_the_snippets(tmp_path, secrets):
    dnsmasq_bin = require_tool("dnsmasq")
    config = tmp_path / "dnsmasq.conf"
    config.write_text("".join(dnsmasq(profile, secrets=secrets) for profile in PROFILES))
    result = run_check([dnsmasq_bin, "--test", f"--conf-file={config}"])
    assert "syntax check OK" in result.stdout + result.stderr
