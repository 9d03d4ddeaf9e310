"""A Matrix user in the sandbox (matrix-nio), as a person's client would be.

Names resolve through the sandbox DNS (172.29.231.2), not the machine's resolver,
and TLS is verified against a CA file the caller names (the sandbox CA's roots, or
a host's own certificate while it still serves its temporary one). Nothing turns
verification off.

    async with SandboxClient("https://matrix.one.test", cafile) as c:
        await c.login("alice", "secret")
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp
import dns.resolver
from aiohttp.abc import AbstractResolver
from nio import AsyncClient, AsyncClientConfig, LoginError, LoginResponse

SANDBOX_DNS = "172.29.231.2"


class SandboxResolver(AbstractResolver):
    """aiohttp resolver that asks the sandbox DNS server."""

    def __init__(self, server: str = SANDBOX_DNS):
        self._dns = dns.resolver.Resolver(configure=False)
        self._dns.nameservers = [server]
        self._dns.lifetime = 5

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        answer = await asyncio.to_thread(self._dns.resolve, host, "A")
        return [
            {"hostname": host, "host": rr.address, "port": port, "family": socket.AF_INET,
             "proto": 0, "flags": socket.AI_NUMERICHOST}
            for rr in answer
        ]

    async def close(self) -> None:
        pass


def resolve(name: str) -> str:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = [SANDBOX_DNS]
    return r.resolve(name, "A")[0].address


class SandboxClient:
    def __init__(self, homeserver_url: str, cafile: str | Path, user: str = ""):
        self.ctx = ssl.create_default_context(cafile=str(cafile))
        self.client = AsyncClient(homeserver_url, user, ssl=self.ctx,
                                  config=AsyncClientConfig(request_timeout=30, max_timeouts=2,
                                                            max_limit_exceeded=0))

    async def __aenter__(self) -> "SandboxClient":
        self.client.client_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=SandboxResolver(), ssl=self.ctx),
            timeout=aiohttp.ClientTimeout(total=30),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def login(self, user: str, password: str) -> LoginResponse | LoginError:
        self.client.user = user
        return await self.client.login(password, device_name="synapse-fabric-test")

    async def request(self, method: str, path: str, body: dict | None = None,
                      token: str | None = None) -> tuple[int, dict]:
        """A client-API request with an access token; (status, json)."""
        headers = {"Authorization": f"Bearer {token or self.client.access_token}"}
        async with self.client.client_session.request(method, self.client.homeserver + path, json=body,
                                                      headers=headers, ssl=self.ctx) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = {}
            return resp.status, data

    async def get(self, path: str, token: str | None = None) -> tuple[int, dict]:
        return await self.request("GET", path, None, token)

    async def post(self, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        return await self.request("POST", path, body, token)
