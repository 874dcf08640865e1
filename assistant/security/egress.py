"""Where fact sheets may be sent: loopback always, other hosts only when explicitly allowed."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


class EgressDenied(PermissionError):
    """The configured LLM server is not on this machine and remote use was not allowed."""


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_llm_egress(base_url: str, *, allow_remote: bool, allow_list: tuple[str, ...] = ()) -> str:
    """Returns 'local', 'allow-listed' or 'remote-allowed'; raises EgressDenied otherwise."""
    host = (urlsplit(base_url).hostname or "").lower()
    if not host:
        raise EgressDenied(f"NVA_LLM_BASE_URL {base_url!r} has no host")
    if is_loopback(host):
        return "local"
    if host in {h.lower() for h in allow_list}:
        return "allow-listed"
    if allow_remote:
        return "remote-allowed"
    raise EgressDenied(
        f"the LLM server {host} is not on this machine; patient facts would leave it. Set "
        "NVA_LLM_ALLOW_REMOTE=true (and prefer NVA_LLM_DEIDENTIFY=true) or add the host to "
        "NVA_LLM_ALLOW_HOSTS after your privacy review"
    )
