"""What a server and a client on the same host share: the loopback test and the token
``boxvm serve`` generates in the home, so that no-token mode is opt-in.

Kept free of the server's dependencies: the remote client imports it.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from pathlib import Path

from boxvm.errors import InvalidArgument
from boxvm.paths import Home

TOKEN_FILE = "server-token"


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, IPv6 with or without brackets) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def token_path(home: Home) -> Path:
    return home.root / TOKEN_FILE


def ensure_token(home: Home) -> str:
    """The home's server token, created (0600, never through a link) on first use."""
    home.ensure()
    path = token_path(home)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        token = read_token(home)
        if token is None:
            raise InvalidArgument(f"{path} is not a token this user alone can read: remove it") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(home: Home) -> str | None:
    """The home's server token, or None when there is none or it is not private to this user
    (a file others can read or write is not a secret)."""
    try:
        fd = os.open(token_path(home), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077 or st.st_size > 4096:
            return None
        token = f.read().strip()
    return token or None
