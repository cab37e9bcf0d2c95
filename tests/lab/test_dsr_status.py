"""`vipd status` against a real etcd: each DSR service's backends with the state the host directory
gives them (present and healthy, unhealthy, absent; static backends are checked by the directors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vipd.config import EtcdConfig
from vipd.election.etcd import EtcdClient
from vipd.election.hosts import HostInfo


async def test_status_lists_each_service_backend_and_its_state(etcd_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    prefix = "/vipd/dsrstatus/"
    async with EtcdClient.from_config(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix)) as client:
        await client.put(prefix + "hosts/web1", HostInfo("web1").to_json())
        await client.put(prefix + "hosts/web2", HostInfo("web2", healthy=False, reasons=("disk",)).to_json())
    cfg = tmp_path / "vipd.toml"
    cfg.write_text(f'node = "web1"\n[etcd]\nendpoints = ["{etcd_server.endpoint}"]\nprefix = "{prefix}"\n'
                   '[[vip]]\nname = "web"\naddress = "192.0.2.10/32"\ninterface = "lo"\nmode = "anycast"\n'
                   '[[vip.service]]\nprotocol = "tcp"\nport = 443\ninterface = "eth0"\n'  # status does no host checks
                   'backends = [{ node = "web1", address = "192.0.2.21" }, { node = "web2", address = "192.0.2.22" },\n'
                   '            { node = "web3", address = "192.0.2.23" }, { address = "192.0.2.50" }]\n')
    out = subprocess.run([sys.executable, "-m", "vipd", "status", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("DSR SERVICE"))
    table = [x.split() for x in lines[start + 1:start + 5]]
    assert table[0][:2] == ["web", "tcp/443"]
    assert [(r[-3], r[-1]) for r in table] == [("web1", "active"), ("web2", "unhealthy"), ("web3", "absent"),
                                               ("192.0.2.50", "static")], out.stdout
