"""vipd's nftables batches as data and as bytes (no root, no kernel). The kernel's side is
tests/lab/test_nft.py, where `nft list ruleset` reads these expressions back."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE
from pyroute2.netlink.nfnetlink import nftsocket as nfts

from vipd.dataplane.nft_build import (
    BGP_SET,
    BgpSnat,
    EgressRule,
    base_ops,
    bgp_exprs,
    disarm_ops,
    encode_batch,
    interval_elems,
    kernel_has_timeout_update,
    lease_ops,
    rule_exprs,
)
from vipd.errors import NftError

IP = ipaddress.ip_address
NET = ipaddress.ip_network
VIP = IP("10.0.0.5")


def x(name: str, **fields: Any) -> dict[str, Any]:
    """An expression spelled out independently of the module's own helper."""
    data = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in fields.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}


def val(b: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", b)]}


WEB = EgressRule("web", VIP, dst=(NET("198.51.100.0/24"), NET("203.0.113.7/32")), proto="tcp",
                 dports=(443, 80), src=(NET("10.1.0.0/16"),), oifname="eth0")


def test_rule_expressions_for_one_egress_rule() -> None:
    # ip daddr @eg_web_dst ip saddr @eg_web_src tcp dport @eg_web_ports oifname "eth0" snat ip to 10.0.0.5
    assert rule_exprs(WEB) == [
        x("meta", dreg=1, key=15), x("cmp", sreg=1, op=0, data=val(b"\x02")),  # meta nfproto ipv4
        x("payload", dreg=1, base=1, offset=16, len=4), x("lookup", set="eg_web_dst", sreg=1),
        x("payload", dreg=1, base=1, offset=12, len=4), x("lookup", set="eg_web_src", sreg=1),
        x("meta", dreg=1, key=16), x("cmp", sreg=1, op=0, data=val(b"\x06")),  # meta l4proto tcp
        x("payload", dreg=1, base=2, offset=2, len=2), x("lookup", set="eg_web_ports", sreg=1),
        x("meta", dreg=1, key=7), x("cmp", sreg=1, op=0, data=val(b"eth0" + b"\0" * 12)),
        x("immediate", dreg=1, data=val(bytes([10, 0, 0, 5]))),
        x("nat", type=0, family=2, reg_addr_min=1),
    ]


def test_minimal_ipv6_rule_and_wildcard_interface() -> None:
    rule = EgressRule("all6", IP("fd00::5"), iifname="veth*")
    assert rule_exprs(rule) == [
        x("meta", dreg=1, key=15), x("cmp", sreg=1, op=0, data=val(b"\x0a")),
        x("payload", dreg=1, base=1, offset=24, len=16), x("lookup", set="eg_all6_dst", sreg=1),
        x("meta", dreg=1, key=6), x("cmp", sreg=1, op=0, data=val(b"veth")),  # prefix match
        x("immediate", dreg=1, data=val(IP("fd00::5").packed)),
        x("nat", type=0, family=10, reg_addr_min=1),
    ]
    assert rule.destinations() == [NET("::/0")]


def test_bgp_expressions() -> None:
    # ip daddr @bgp_peers tcp dport 179 snat ip to 10.9.9.9
    assert bgp_exprs(BgpSnat(IP("10.9.9.9"), (IP("192.0.2.1"),))) == [
        x("meta", dreg=1, key=15), x("cmp", sreg=1, op=0, data=val(b"\x02")),
        x("payload", dreg=1, base=1, offset=16, len=4), x("lookup", set=BGP_SET, sreg=1),
        x("meta", dreg=1, key=16), x("cmp", sreg=1, op=0, data=val(b"\x06")),
        x("payload", dreg=1, base=2, offset=2, len=2), x("cmp", sreg=1, op=0, data=val(b"\x00\xb3")),
        x("immediate", dreg=1, data=val(bytes([10, 9, 9, 9]))),
        x("nat", type=0, family=2, reg_addr_min=1),
    ]


def test_interval_elements_as_nft_encodes_prefixes() -> None:
    end = ("NFTA_SET_ELEM_FLAGS", frozenset({1}))
    assert interval_elems([NET("198.51.100.0/24"), NET("203.0.113.7/32")], 500) == [
        {"attrs": [("NFTA_SET_ELEM_KEY", val(bytes([198, 51, 100, 0]))),
                   ("NFTA_SET_ELEM_TIMEOUT", 500), ("NFTA_SET_ELEM_EXPIRATION", 500)]},
        {"attrs": [("NFTA_SET_ELEM_KEY", val(bytes([198, 51, 101, 0]))), end]},
        {"attrs": [("NFTA_SET_ELEM_KEY", val(bytes([203, 0, 113, 7]))),
                   ("NFTA_SET_ELEM_TIMEOUT", 500), ("NFTA_SET_ELEM_EXPIRATION", 500)]},
        {"attrs": [("NFTA_SET_ELEM_KEY", val(bytes([203, 0, 113, 8]))), end]},
    ]
    # the top of the address space has no end element: an open interval, as nft flags it
    open_flag = ("NFTA_SET_ELEM_USERDATA", [("NFTNL_UDATA_SET_ELEM_FLAGS", b"\x01\x00\x00\x00")])
    assert interval_elems([NET("0.0.0.0/0")]) == [{"attrs": [("NFTA_SET_ELEM_KEY", val(bytes(4))), open_flag]}]
    assert interval_elems([NET("ffff::/16")]) == [{"attrs": [("NFTA_SET_ELEM_KEY", val(IP("ffff::").packed)),
                                                              open_flag]}]


def test_base_batch_contents() -> None:
    bgp = BgpSnat(IP("10.9.9.9"), (IP("192.0.2.1"),))
    ops = base_ops([WEB], bgp)
    summary = [(op.msg_type, dict(op.attrs).get("NFTA_SET_NAME") or dict(op.attrs).get("NFTA_SET_ELEM_LIST_SET"))
               for op in ops]
    assert summary == [
        (nfts.NFT_MSG_NEWTABLE, None), (nfts.NFT_MSG_DELTABLE, None), (nfts.NFT_MSG_NEWTABLE, None),
        (nfts.NFT_MSG_NEWSET, BGP_SET), (nfts.NFT_MSG_NEWSETELEM, BGP_SET),
        (nfts.NFT_MSG_NEWSET, "eg_web_dst"),  # the lease set: empty until armed
        (nfts.NFT_MSG_NEWSET, "eg_web_src"), (nfts.NFT_MSG_NEWSETELEM, "eg_web_src"),
        (nfts.NFT_MSG_NEWSET, "eg_web_ports"), (nfts.NFT_MSG_NEWSETELEM, "eg_web_ports"),
        (nfts.NFT_MSG_NEWCHAIN, None), (nfts.NFT_MSG_NEWRULE, None), (nfts.NFT_MSG_NEWRULE, None),
    ]
    assert all(dict(op.attrs).get("NFTA_TABLE_NAME", "vipd") == "vipd" for op in ops)
    lease = dict(ops[5].attrs)
    assert lease["NFTA_SET_FLAGS"] == {"NFT_SET_INTERVAL", "NFT_SET_TIMEOUT"}
    assert lease["NFTA_SET_USERDATA"] == [("NFTNL_UDATA_SET_COMMENT", "vip 10.0.0.5")]
    assert len({dict(op.attrs)["NFTA_SET_ID"] for op in ops if op.msg_type == nfts.NFT_MSG_NEWSET}) == 4
    ports = dict(ops[9].attrs)["NFTA_SET_ELEM_LIST_ELEMENTS"]
    assert ports == [{"attrs": [("NFTA_SET_ELEM_KEY", val(b"\x00\x50"))]},
                     {"attrs": [("NFTA_SET_ELEM_KEY", val(b"\x01\xbb"))]}]
    chain = dict(ops[10].attrs)
    assert chain["NFTA_CHAIN_TYPE"] == "nat" and chain["NFTA_CHAIN_POLICY"] == 1
    assert chain["NFTA_CHAIN_HOOK"] == {"attrs": [("NFTA_HOOK_HOOKNUM", 4), ("NFTA_HOOK_PRIORITY", 100)]}
    rules = [dict(op.attrs) for op in ops[11:]]
    assert [r["NFTA_RULE_USERDATA"] for r in rules] == ["vipd bgp source", "vipd egress web"]
    assert rules[1]["NFTA_RULE_EXPRESSIONS"] == rule_exprs(WEB)
    assert all(op.flags == NLM_F_CREATE | NLM_F_APPEND for op in ops[11:])


def test_base_batch_carries_armed_vips_over() -> None:
    ops = base_ops([WEB], None, {VIP: 1234, IP("10.0.0.6"): 99})
    [arm] = [op for op in ops if op.msg_type == nfts.NFT_MSG_NEWSETELEM
             and dict(op.attrs)["NFTA_SET_ELEM_LIST_SET"] == "eg_web_dst"]
    assert dict(arm.attrs)["NFTA_SET_ELEM_LIST_ELEMENTS"] == interval_elems(WEB.destinations(), 1234)


def test_lease_and_disarm_ops() -> None:
    [update] = lease_ops([WEB], 800)
    assert update.msg_type == nfts.NFT_MSG_NEWSETELEM and update.flags == NLM_F_CREATE  # no EXCL: update
    assert dict(update.attrs)["NFTA_SET_ELEM_LIST_ELEMENTS"] == interval_elems(WEB.destinations(), 800)
    flush, add = lease_ops([WEB], 800, timeout_update=False)
    assert flush.msg_type == nfts.NFT_MSG_DELSETELEM and "NFTA_SET_ELEM_LIST_ELEMENTS" not in dict(flush.attrs)
    assert add == update
    assert disarm_ops([WEB]) == [flush]


def test_encoded_batch_bytes() -> None:
    msgs = encode_batch(base_ops([WEB], None) + lease_ops([WEB], 800))
    for m in msgs:
        m.encode()
    begin, *inner, end = msgs
    assert (begin["header"]["type"], end["header"]["type"]) == (0x10, 0x11)
    assert begin.data[16:20] == b"\x00\x00\x00\x0a"  # nfgenmsg: family 0, version 0, res_id NFNL_SUBSYS_NFTABLES
    for m in inner:
        assert m["header"]["flags"] & NLM_F_ACK
        assert m["header"]["type"] >> 8 == 10 and m.data[16] == 1  # nf_tables, family inet
    rule = next(m for m in inner if m["header"]["type"] & 0xFF == nfts.NFT_MSG_NEWRULE)
    # NFTA_RULE_USERDATA (7) = nftnl comment TLV: type 0, length 16, "vipd egress web\0"
    assert struct.pack("=HH", 4 + 18, 7) + b"\x00\x10vipd egress web\x00" in rule.data
    lease = inner[-1].data
    assert struct.pack("=HH", 8, 3) + b"\x00\x00\x00\x01" in lease  # NFTA_SET_ELEM_FLAGS = INTERVAL_END
    assert struct.pack("=HH", 12, 4) + struct.pack(">Q", 800) in lease  # NFTA_SET_ELEM_TIMEOUT, ms
    assert struct.pack("=HH", 12, 5) + struct.pack(">Q", 800) in lease  # NFTA_SET_ELEM_EXPIRATION
    # and what the kernel would decode
    decoded = nfts.nft_set_elem_list_msg(lease)
    decoded.decode()
    elems = decoded.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS")
    assert [e.get_attr("NFTA_SET_ELEM_TIMEOUT") for e in elems] == [800, None, 800, None]


@pytest.mark.parametrize("kw, match", [
    ({"name": "bad name"}, "name must match"),
    ({"dst": (NET("fd00::/64"),)}, "must be IPv4"),
    ({"proto": "icmp"}, "proto must be"),
    ({"dports": (80,)}, "need proto"),
    ({"proto": "tcp", "dports": (0,)}, "ports must be"),
    ({"proto": "tcp", "dports": (True,)}, "ports must be"),
    ({"oifname": "x" * 16}, "interface name"),
])
def test_rule_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(NftError, match=match):
        EgressRule(**{"name": "r", "vip": VIP, **kw})


def test_duplicate_names_and_bgp_families() -> None:
    with pytest.raises(NftError, match="unique"):
        base_ops([EgressRule("a", VIP), EgressRule("a", IP("10.0.0.6"))], None)
    with pytest.raises(NftError, match="IPv4"):
        BgpSnat(IP("10.9.9.9"), (IP("fd00::1"),))


def test_overlapping_destinations_are_merged() -> None:
    rule = EgressRule("m", VIP, dst=(NET("10.0.0.0/8"), NET("10.1.0.0/16"), NET("11.0.0.0/8")))
    assert rule.destinations() == [NET("10.0.0.0/7")]


@pytest.mark.parametrize("release, expected", [
    ("6.18.44-fc-v669", True), ("6.11.0", True), ("6.10.14-amd64", False), ("5.15.0-91-generic", False),
])
def test_kernel_timeout_update_detection(release: str, expected: bool) -> None:
    assert kernel_has_timeout_update(release) is expected


def test_old_import_paths_still_work() -> None:
    from vipd import errors
    from vipd.dataplane import nft, routes

    assert nft.NftError is errors.NftError and routes.RouteError is errors.RouteError
    assert issubclass(errors.NftError, errors.DataplaneError) and issubclass(errors.RouteError, errors.DataplaneError)
    assert nft.EgressRule is EgressRule and nft.BgpSnat is BgpSnat and nft.NftManager
