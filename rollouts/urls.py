"""Agent URLs with credentials in them (``http://user:password@host:port``, a basic-auth proxy).

The password is needed in one place only: the ``Authorization`` header of each request, which
``AgentClient`` builds from ``AgentCredentials``. Everywhere else (the dispatch plan, a Prefect
task input; health and replica files; run.json; artifacts, logs, messages) an agent's URL is
its redacted form, ``http://user:***@host:port``, made by ``redact`` and nothing else. The
redacted URL is also what the client recognizes the agent by, so the real one is never rebuilt.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rollouts.errors import ConfigError

if TYPE_CHECKING:  # the settings import this module; httpx loads with the client
    import httpx

REDACTED = "***"

# scheme://user:password@ (the password up to the authority's last @) or scheme://token@.
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/?#@:\s]*)(?::(?P<password>[^/?#\s]*))?@"
)


def _redacted(match: re.Match[str]) -> str:
    if match["password"] is None:  # user info without a password: it may be a token
        return f"{match['scheme']}{REDACTED}@"
    return f"{match['scheme']}{match['user']}:{REDACTED}@"


def redact(text: str) -> str:
    """``text`` (a URL, or any message that holds URLs) with every URL's password replaced by
    ``***`` (a user name alone, which may be a token, is replaced whole). Idempotent."""
    return _USERINFO.sub(_redacted, text) if "@" in text else text


def has_credentials(url: str) -> bool:
    return _USERINFO.search(url) is not None


def _origin(url: httpx.URL) -> tuple[str, str, str, int | None]:
    """What credentials are found by: scheme, redacted user info, host, port."""
    userinfo = redact(f"x://{url.userinfo.decode()}@").removeprefix("x://").removesuffix("@")
    return url.scheme, userinfo, url.host, url.port


class AgentCredentials:
    """The basic-auth headers of the agent URLs that carry credentials, by redacted URL.

    Built from the settings (ROLLOUTS_AGENTS) in each collecting process; never a task input,
    never stored. Its repr shows no secret.
    """

    def __init__(self, urls: Iterable[str]) -> None:
        import httpx

        self._headers: dict[tuple[str, str, str, int | None], str] = {}
        for raw in urls:
            url = httpx.URL(raw)
            if not url.userinfo:
                continue
            secret = f"{url.username}:{url.password}".encode()
            header = "Basic " + base64.b64encode(secret).decode("ascii")
            key = _origin(url)
            if self._headers.setdefault(key, header) != header:
                raise ConfigError(
                    f"ROLLOUTS_AGENTS: {redact(raw)} is listed with two different passwords"
                )

    def __repr__(self) -> str:
        return f"AgentCredentials({len(self._headers)} URL(s) with credentials)"

    def __bool__(self) -> bool:
        return bool(self._headers)

    def split(self, url: httpx.URL) -> tuple[httpx.URL, str | None]:
        """``url`` (redacted or not) without its user info, and the ``Authorization`` value
        its credentials make (None: it carries none)."""
        if not url.userinfo:
            return url, None
        header = self._headers.get(_origin(url))
        if header is None:
            raise MissingCredentials(
                f"no password for {redact(str(url))} in this process's ROLLOUTS_AGENTS: "
                "every process that collects (Dask workers too) needs the same ROLLOUTS_AGENTS"
            )
        return url.copy_with(userinfo=b""), header


class MissingCredentials(ConfigError):
    """An agent URL's password is not in this process's settings."""
