"""Pure parts of the nftables token fence: timeouts, the hand-encoded token batch, acks, the setup batch."""

from __future__ import annotations

import ipaddress
import struct

from vipd.dataplane.fence_wire import MIN_TOKEN_MS, parse_acks, token_batch, token_ms

V4 = ipaddress.ip_address("10.0.0.1")
V6 = ipaddress.ip_address("fd00::1")


def messages(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, seq) of every netlink message, checking that lengths tile the buffer."""
    out, off = [], 0
    while off < len(data):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        assert length >= 20 and off + length <= len(data)
        out.append((kind, flags, seq))
        off += (length + 3) & ~3
    assert off == len(data)
    return out


def test_token_ms_rounds_down_and_refuses_sub_tick_timeouts() -> None:
    assert token_ms(10.9999, 10.0) == 999
    assert token_ms(10.0 + MIN_TOKEN_MS / 1000 + 1e-9, 10.0) == MIN_TOKEN_MS
    assert token_ms(10.0 + (MIN_TOKEN_MS - 1) / 1000, 10.0) == 0  # would be a permanent element
    assert token_ms(9.0, 10.0) == 0


def test_token_batch_update_kernel_one_message_per_family() -> None:
    data, last = token_batch([(V4, 500), (V6, 500)], [], seq=7)
    kinds = messages(data)
    assert [k for k, _, _ in kinds] == [0x10, 0x0A0C, 0x0A0C, 0x11]  # begin, NEWSETELEM x2, end
    assert last == 9 and kinds[2][1] & 0x4 and not kinds[1][1] & 0x4  # only the last asks for an ack
    assert struct.pack("!Q", 500) * 1 in data and V6.packed in data


def test_token_batch_old_kernel_and_removal_never_fail_on_absent_elements() -> None:
    data, last = token_batch([(V4, 500)], [V6], seq=1, timeout_update=False)
    kinds = [k for k, _, _ in messages(data)]
    # v4: add, delete, add (re-adding does not reset a timeout on < 6.11); v6: add, delete
    assert kinds == [0x10, 0x0A0C, 0x0A0E, 0x0A0C, 0x0A0C, 0x0A0E, 0x11]
    assert last == 6
    assert token_batch([], [], seq=1)[1] == -1


def test_parse_acks() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0, 5, 0) + struct.pack("=i", 0) + b"\0" * 16
    err = struct.pack("=IHHII", 36, 2, 0, 6, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert parse_acks(ack + err) == [(5, 0), (6, 2)]


def test_token_batch_groups_and_grants_in_one_batch() -> None:
    data, last = token_batch([(V4, 500)], [], seq=1, grants=[(2, 90)], ungrant=[3], join=[(V4, 2)], leave=[V4])
    kinds = [k for k, _, _ in messages(data)]
    # group4: leave (delete) before join (add); token4; grant_2 armed; grant_3 removed (add, delete)
    assert kinds == [0x10, 0x0A0E, 0x0A0C, 0x0A0C, 0x0A0C, 0x0A0C, 0x0A0E, 0x11]
    assert last == 7
    assert b"group4\0" in data and b"grant_2\0" in data and b"grant_3\0" in data
    assert struct.pack("!i", -3) in data  # the join's verdict: jump (to chain grant_2)
    assert data.count(struct.pack("!H", 0x0806)) == 3  # the arp element: grant_2 armed, grant_3 added and deleted


def test_setup_leaves_the_chains_and_rules_of_hooked_devices_alone():
    """A reload's setup batch rewrites the managed sets, but not the chains and rules of a device
    already hooked: rewriting them held the fence's lock 23-27 ms instead of 4 at 4 VIPs
    (bench/fence.py), and the successors' grants lapsed behind it (tests/lab/test_reload.py)."""
    from pyroute2.netlink.nfnetlink import nftsocket as nfts

    from vipd.dataplane.fence_build import chain_names, setup_ops

    def touched(ops) -> set:  # type: ignore[no-untyped-def]
        kinds = (nfts.NFT_MSG_NEWCHAIN, nfts.NFT_MSG_DELCHAIN, nfts.NFT_MSG_NEWRULE, nfts.NFT_MSG_DELRULE)
        return {dict(op.attrs).get("NFTA_CHAIN_NAME") or dict(op.attrs).get("NFTA_RULE_CHAIN")
                for op in ops if op.msg_type in kinds}

    managed = [(V4, "eth0"), (V6, "eth1")]
    assert touched(setup_ops(managed)) == {*chain_names("eth0"), *chain_names("eth1")}
    assert touched(setup_ops(managed, hooked=["eth0"])) == set(chain_names("eth1"))
    assert touched(setup_ops(managed, stale_devs=["eth0", "eth1", "old"], hooked=["eth0", "eth1"])) == set(chain_names("old"))


def test_setup_writes_only_the_difference_from_the_sets_the_kernel_holds():
    """With the kernel's current keys (a reload), the managed and ARP/ND-only sets get deletes and
    adds of the difference; without them (a fresh table), a flush and a refill."""
    from pyroute2.netlink.nfnetlink import nftsocket as nfts

    from vipd.dataplane.fence_build import setup_ops

    def elems(ops, kind: int, name: str) -> list:  # type: ignore[no-untyped-def]
        out = []
        for op in ops:
            a = dict(op.attrs)
            if op.msg_type == kind and a["NFTA_SET_ELEM_LIST_SET"] == name:
                out.append([e["attrs"][0][1]["attrs"][0][1] for e in a.get("NFTA_SET_ELEM_LIST_ELEMENTS", [])])
        return out

    other = ipaddress.ip_address("10.0.0.2")
    managed = [(V4, "eth0"), (V6, "eth0")]
    fresh = setup_ops(managed, l2only=[V4])
    assert elems(fresh, nfts.NFT_MSG_DELSETELEM, "managed4") == [[]]  # flush (no element list)
    assert elems(fresh, nfts.NFT_MSG_NEWSETELEM, "managed4") == [[V4.packed]]
    present = {"managed4": {V4.packed, other.packed}, "managed6": set(), "l2only4": {V4.packed}, "l2only6": set()}
    ops = setup_ops(managed, l2only=[V4], hooked=["eth0"], present=present)
    assert elems(ops, nfts.NFT_MSG_DELSETELEM, "managed4") == [[other.packed]]
    assert elems(ops, nfts.NFT_MSG_NEWSETELEM, "managed4") == []
    assert elems(ops, nfts.NFT_MSG_NEWSETELEM, "managed6") == [[V6.packed]]
    assert elems(ops, nfts.NFT_MSG_DELSETELEM, "managed6") == []
    assert elems(ops, nfts.NFT_MSG_DELSETELEM, "l2only4") == elems(ops, nfts.NFT_MSG_NEWSETELEM, "l2only4") == []
    assert elems(setup_ops(managed, present={"managed6": set()}), nfts.NFT_MSG_DELSETELEM, "managed4") == [[]]
