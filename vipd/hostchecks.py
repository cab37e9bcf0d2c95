"""Read-only checks of files a config names, shared by `vipd check` (vipd.config_host), the health
checks and the etcd client: TLS files that load, programs that only their owner can change, a state
directory vipd can use. Each raises ConfigError(key, reason): one line, no traceback."""

from __future__ import annotations

import os
import shutil
import ssl
import stat

from vipd.errors import ConfigError


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None, key_prefix: str,
                *, verify: bool = True) -> ssl.SSLContext:
    """A client TLS context from the configured files; ConfigError naming `<key_prefix>.ca_file` (or
    cert_file / key_file) when one is missing, unreadable or not PEM."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as e:  # (an OSError too: first)
        raise ConfigError(f"{key_prefix}.ca_file", f"{ca_file} holds no PEM CA certificate ({e.reason or e})") from None
    except FileNotFoundError:
        raise ConfigError(f"{key_prefix}.ca_file", f"{ca_file}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{key_prefix}.ca_file", f"cannot read {ca_file}: {e.strerror or e}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file is not None:
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise ConfigError(f"{key_prefix}.cert_file", f"{cert_file} / {key_file}: not a PEM certificate with "
                                                         f"its matching key ({e.reason or e})") from None
        except OSError as e:
            which = "cert_file" if not os.access(cert_file, os.R_OK) else "key_file"
            raise ConfigError(f"{key_prefix}.{which}", f"cannot read {getattr(e, 'filename', None) or cert_file}: "
                                                       f"{e.strerror or e}") from None
    return ctx


def check_program(key: str, program: str) -> None:
    """A program vipd runs (hook, command check) exists, is executable, and cannot be replaced by
    anyone else: neither the file nor its directory is world-writable (a sticky directory such as
    /tmp still lets its owner swap the file), nor is the file group-writable."""
    found = program if os.sep in program else shutil.which(program)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise ConfigError(key, f"{program!r} is not an executable file")
    path = os.path.realpath(found)
    st = os.stat(path)
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(key, f"{path} is {'world' if st.st_mode & stat.S_IWOTH else 'group'}-writable: "
                               f"anyone who can change it runs code as vipd (chmod go-w {path})")
    for parent in sorted({os.path.dirname(path), os.path.dirname(os.path.abspath(found))}):
        if os.stat(parent).st_mode & stat.S_IWOTH:  # the file itself, or the symlink to it
            raise ConfigError(key, f"{found} is in a world-writable directory ({parent}): move it somewhere only "
                                   "root can write")


def check_state_dir(key: str, path: str) -> None:
    """The state directory is a directory (or can be made as one) that this user can write."""
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(key, f"{probe} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{probe} is not writable by this user (uid {os.getuid()})")
