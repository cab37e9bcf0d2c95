# vipd — two commands matter on a fresh Debian 12 machine (as root):
#   make test   installs what the suite needs, then runs every test (lab tests included)
#   make demo   installs what the demo needs, then runs a live failover in network namespaces
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := etcd-server nftables bird2 frr iproute2 iputils-ping arping procps tcpdump openssl python3-venv strace systemd \
	debhelper dh-virtualenv dpkg-dev build-essential lintian prometheus \
	clang llvm libbpf-dev libbpf1 linux-libc-dev
PYTEST_ARGS ?=

.PHONY: test demo deps apt venv unit lab bench clean typecheck deb bpf

test: deps bpf typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

typecheck: venv
	$(PY) -m mypy

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lab: deps bpf
	$(PY) -m pytest tests/lab $(PYTEST_ARGS)

demo: deps bpf
	$(PY) -m vipd demo

bench: deps bpf
	@for p in keepalived vip-manager; do dpkg -s $$p >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends keepalived vip-manager; systemctl disable --now keepalived vip-manager >/dev/null 2>&1 || true; break; }; done
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/failover.py

deps: apt venv

# The DSR director (tc eBPF), compiled here and never committed: build/ is gitignored.
BPF_CFLAGS := -O2 -g -Wall -target bpf -I/usr/include/$(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
bpf: build/dsr.o

build/dsr.o: bpf/dsr.c
	@mkdir -p build
	clang $(BPF_CFLAGS) -c $< -o $@

# Installs the Debian packages only when one is missing (needs root, as do the lab tests).
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  for svc in etcd bird frr prometheus prometheus-node-exporter; do systemctl disable --now $$svc >/dev/null 2>&1 || true; done; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The Debian package (dh-virtualenv), checked by lintian: build/deb/vipd_<version>_<arch>.deb
deb: apt
	packaging/build-deb.sh build/deb

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build
