"""Reading BIRD 2's answers (vipd.lab.bgp): `show route`, `show protocols` and the control socket's
reply framing, from output captured from BIRD 2.0.12. No BIRD needed."""

from __future__ import annotations

import io

import pytest

from vipd.lab.bgp import BirdError, BirdRoute, _reply, host_config, parse_protocols, parse_routes
from vipd.lab.frr import frr_config

ROUTES = """Table master4:
198.18.0.20/32       unicast [h1 19:31:40.951] * (100) [AS65001i]
\tvia 10.213.0.61 on vtg5a8en
                     unicast [h2 19:31:40.761] (100) [AS65001i]
\tvia 10.213.0.62 on vtg5a8en
                     unicast [h3 19:31:40.844] (100) [AS65001i]
\tvia 10.213.0.63 on vtg5a8en
198.18.0.10/32       unicast [h3 19:31:40.844] * (100) [AS65001i]
\tvia 10.213.0.63 on vtg5a8en
\tType: BGP univ
\tBGP.next_hop: 10.213.0.63
198.18.0.30/32       unicast [vipd_vips 19:31:39.989] * (240)
\tdev lo
"""

PROTOCOLS = """Name       Proto      Table      State  Since         Info
device1    Device     ---        up     19:31:39.965  
vipd_kernel Kernel     master4    up     19:31:39.965  
h1         BGP        ---        up     19:31:40.946  Established   
h2         BGP        ---        start  19:31:40.723  Active        Socket: Connection refused
h3         BGP        ---        start  2026-11-23 19:31:40  Connect
"""


def test_show_route() -> None:
    assert parse_routes(ROUTES) == [
        BirdRoute("198.18.0.20/32", "h1", True, ("10.213.0.61",)),
        BirdRoute("198.18.0.20/32", "h2", False, ("10.213.0.62",)),
        BirdRoute("198.18.0.20/32", "h3", False, ("10.213.0.63",)),
        BirdRoute("198.18.0.10/32", "h3", True, ("10.213.0.63",)),
        BirdRoute("198.18.0.30/32", "vipd_vips", True, ()),
    ]
    assert parse_routes("Table master4:\n") == [] == parse_routes("Network not found\n")


def test_show_protocols() -> None:
    got = parse_protocols(PROTOCOLS)
    assert got["h1"] == ("BGP", "up", "Established")
    assert got["h2"] == ("BGP", "start", "Active Socket: Connection refused")
    assert got["h3"] == ("BGP", "start", "Connect")
    assert got["vipd_kernel"] == ("Kernel", "up", "") and set(got) == {"device1", "vipd_kernel", "h1", "h2", "h3"}


def test_control_socket_framing() -> None:
    # captured from BIRD 2.0.12: "show route 198.18.0.10/32 all", then "show route 198.18.0.99/32"
    f = io.BytesIO(b"0001 BIRD 2.0.12 ready.\n1007-Table master4:\n 198.18.0.10/32       unicast [kernel1 "
                   b"19:40:51.144] * (10)\n \tvia 10.213.0.11 on vtg4282n\n1008-\tType: inherit univ\n"
                   b"1012-\tKernel.source: 3\n \tKernel.metric: 0\n0000 \n"
                   b"8001 Network not found\n")
    assert _reply(f) == []  # the banner
    text = _reply(f)
    assert text == ["Table master4:", "198.18.0.10/32       unicast [kernel1 19:40:51.144] * (10)",
                    "\tvia 10.213.0.11 on vtg4282n", "\tType: inherit univ", "\tKernel.source: 3", "\tKernel.metric: 0"]
    assert parse_routes("\n".join(text)) == [BirdRoute("198.18.0.10/32", "kernel1", True, ("10.213.0.11",))]
    with pytest.raises(BirdError) as e:
        _reply(f)
    assert e.value.code == 8001
    with pytest.raises(OSError):
        _reply(f)


def test_configs_fill_in_the_shipped_snippets() -> None:
    bird = host_config("10.213.0.11", "10.213.0.61", "10.213.0.1", "198.18.0.0/24")
    assert "define VIPD_VIPS = [ 198.18.0.0/24{32,32} ];" in bird and "define VIPD_SOURCE = 10.213.0.61;" in bird
    assert bird.rstrip().endswith('bird2-vipd.conf";')
    frr = frr_config("10.213.0.61", "10.213.0.1", "198.18.0.0/24")
    assert " neighbor 10.213.0.1 update-source 10.213.0.61" in frr and "192.0.2.1" not in frr
    assert "ip prefix-list VIPD-VIPS seq 10 permit 198.18.0.0/24 ge 32 le 32" in frr
