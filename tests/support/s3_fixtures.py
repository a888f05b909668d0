"""pytest fixtures for a real S3 (SeaweedFS) and a fault-injecting proxy in front of it.

Load with ``pytest_plugins = ["tests.support.s3_fixtures"]`` in tests/conftest.py.
Every server or proxy a fixture creates is stopped by that fixture, also when the test fails.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.seaweed import SeaweedServer


@dataclass
class S3Bucket:
    name: str
    endpoint: str
    env: dict[str, str]  # what a job subprocess needs to reach this bucket
    client: Any = field(repr=False)
    server: SeaweedServer = field(repr=False)


def s3_env(server: SeaweedServer, endpoint: str | None = None) -> dict[str, str]:
    """Environment for the job: credentials and endpoint, nothing from the developer's AWS setup."""
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
        "QA_S3_ENDPOINT_URL": endpoint or server.endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",  # no 1 s IMDS probe when something is missing
    }


def _started(path) -> SeaweedServer:
    server = SeaweedServer(path)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory) -> SeaweedServer:
    """One server shared by the session; tests must not stop it (use ``seaweed_private``)."""
    server = _started(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seaweed_private(tmp_path) -> SeaweedServer:
    """A server of the test's own, free to be stopped and started again (same ports, same data)."""
    server = _started(tmp_path / "seaweed")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed, request) -> S3Bucket:
    """A fresh, uniquely named bucket on the shared server, removed afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:12]}".lstrip("-")
    client = seaweed.client()
    client.create_bucket(Bucket=name)
    yield S3Bucket(name=name, endpoint=seaweed.endpoint, env=s3_env(seaweed), client=client,
                   server=seaweed)
    try:
        client.delete_bucket(Bucket=name)  # weed mini deletes non-empty buckets too
    except Exception:
        pass  # leftovers on a throwaway server are harmless; a failing teardown is not


@pytest.fixture
def fault_proxy() -> Callable[[SeaweedServer], FaultProxy]:
    """Factory: ``fault_proxy(server)`` puts a FaultProxy in front of ``server``'s S3 port."""
    proxies: list[FaultProxy] = []

    def make(server: SeaweedServer) -> FaultProxy:
        proxy = FaultProxy(server.host, server.port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()
