"""The S3 test infrastructure is real: auth, conditional writes, restarts and network faults."""
from __future__ import annotations

import time

import pytest
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import (ClientError, ConnectTimeoutError, HTTPClientError,
                                 ReadTimeoutError)

NETWORK_ERRORS = (BotoConnectionError, HTTPClientError)  # what a reset or a refused connection raises
# Config "max_attempts" counts *retries* (1 = two tries); total_max_attempts=1 really means one.
ONE_TRY = {"retries": {"total_max_attempts": 1}}


def _status(err: ClientError) -> int:
    return err.response["ResponseMetadata"]["HTTPStatusCode"]


def test_round_trip(s3_bucket):
    body = bytes(range(256)) * 4096
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="dir/blob.bin", Body=body)
    got = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="dir/blob.bin")["Body"].read()
    assert got == body
    keys = [o["Key"] for o in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]]
    assert keys == ["dir/blob.bin"]
    assert s3_bucket.env["QA_S3_ENDPOINT_URL"] == s3_bucket.endpoint.rstrip("/")


def test_wrong_secret_is_refused(s3_bucket):
    bad = s3_bucket.server.client(secret_key="not-the-secret", **ONE_TRY)
    with pytest.raises(ClientError) as err:
        bad.list_objects_v2(Bucket=s3_bucket.name)
    assert _status(err.value) == 403


def test_conditional_writes(s3_bucket):
    c, b = s3_bucket.client, s3_bucket.name
    first = c.put_object(Bucket=b, Key="marker", Body=b"one", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=b, Key="marker", Body=b"two", IfNoneMatch="*")
    assert _status(err.value) == 412
    with pytest.raises(ClientError) as err:
        c.put_object(Bucket=b, Key="marker", Body=b"three", IfMatch='"0123456789abcdef"')
    assert _status(err.value) == 412
    c.put_object(Bucket=b, Key="marker", Body=b"four", IfMatch=first["ETag"])
    assert c.get_object(Bucket=b, Key="marker")["Body"].read() == b"four"


def test_stop_start_keeps_objects_and_ports(seaweed_private, fault_proxy):
    server = seaweed_private
    endpoint = server.endpoint
    server.make_bucket("survivors")
    server.client().put_object(Bucket="survivors", Key="k", Body=b"still here")
    proxy = fault_proxy(server)
    via_proxy = server.client(proxy.endpoint, connect_timeout=2, read_timeout=5, **ONE_TRY)

    server.stop()
    assert not server.running
    with pytest.raises(NETWORK_ERRORS):
        server.client(connect_timeout=2, **ONE_TRY).list_buckets()
    with pytest.raises(NETWORK_ERRORS):  # the proxy fails fast while its target is down
        via_proxy.list_buckets()

    server.start()
    assert server.endpoint == endpoint
    assert server.client().get_object(Bucket="survivors", Key="k")["Body"].read() == b"still here"
    assert via_proxy.get_object(Bucket="survivors", Key="k")["Body"].read() == b"still here"


def test_proxy_reset_next(s3_bucket, fault_proxy):
    proxy = fault_proxy(s3_bucket.server)
    client = s3_bucket.server.client(proxy.endpoint, **ONE_TRY)
    client.head_bucket(Bucket=s3_bucket.name)  # leaves a kept-alive connection in the pool

    proxy.reset_next(1)
    with pytest.raises(NETWORK_ERRORS):
        client.head_bucket(Bucket=s3_bucket.name)
    assert proxy.resets_done == 1
    client.head_bucket(Bucket=s3_bucket.name)

    fresh = s3_bucket.server.client(proxy.endpoint, **ONE_TRY)  # and a brand-new connection
    proxy.reset_next(1)
    with pytest.raises(NETWORK_ERRORS):
        fresh.list_objects_v2(Bucket=s3_bucket.name)
    fresh.list_objects_v2(Bucket=s3_bucket.name)
    assert proxy.resets_done == 2
    assert proxy.connections_seen >= 2


def test_proxy_reset_during_upload(s3_bucket, fault_proxy):
    proxy = fault_proxy(s3_bucket.server)
    client = s3_bucket.server.client(proxy.endpoint, **ONE_TRY)
    body = b"x" * (2 << 20)
    proxy.reset_after_bytes(256 << 10)
    with pytest.raises(NETWORK_ERRORS):
        client.put_object(Bucket=s3_bucket.name, Key="big", Body=body)
    assert proxy.resets_done == 1
    with pytest.raises(ClientError) as err:  # nothing half-written became visible
        s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="big")
    assert _status(err.value) == 404

    proxy.pass_through()
    client.put_object(Bucket=s3_bucket.name, Key="big", Body=body)
    assert s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="big")["ContentLength"] == len(body)


def test_proxy_blackhole_times_out(s3_bucket, fault_proxy):
    proxy = fault_proxy(s3_bucket.server)
    client = s3_bucket.server.client(proxy.endpoint, connect_timeout=1, read_timeout=1, **ONE_TRY)
    client.head_bucket(Bucket=s3_bucket.name)  # a pooled connection must be swallowed too
    proxy.blackhole()
    for _ in range(2):  # first the pooled connection, then a new one
        started = time.monotonic()
        with pytest.raises((ReadTimeoutError, ConnectTimeoutError)):
            client.head_bucket(Bucket=s3_bucket.name)
        assert time.monotonic() - started < 5

    proxy.pass_through()
    client.head_bucket(Bucket=s3_bucket.name)
    assert proxy.connections_seen == 3


def test_proxy_latency(s3_bucket, fault_proxy):
    proxy = fault_proxy(s3_bucket.server)
    client = s3_bucket.server.client(proxy.endpoint, **ONE_TRY)
    client.head_bucket(Bucket=s3_bucket.name)
    proxy.latency(0.3)
    started = time.monotonic()
    client.head_bucket(Bucket=s3_bucket.name)
    assert time.monotonic() - started >= 0.3
