"""A real S3 API on loopback for tests and the demo: moto's threaded server.

What moto 5.2.1 enforces for anonymous (botocore UNSIGNED, no Authorization header) requests,
checked against the running server:

- GetObject/HeadObject: allowed only when the bucket policy permits `s3:GetObject` (HEAD: moto checks
  `s3:HeadObject`, so the policy below lists both) on the key, or the object's ACL is public-read.
  Otherwise 403 (HEAD: bare 403, no error code). So a bucket without a policy is "not public" for GETs,
  while signed requests (any access key, e.g. "testing") still succeed: use that for 403 tests.
- ListObjectsV2 / ListBuckets / CreateBucket / PutObject: NOT checked for anonymous requests; an unsigned
  LIST of a private bucket succeeds. moto cannot emulate a 403 on LIST.
- A policy `Deny` applies to every caller (moto does not evaluate the principal), so it cannot model
  "anonymous denied, owner allowed".
- INITIAL_NO_AUTH_ACTION_COUNT only turns on IAM checks for *signed* requests (needs IAM users); it does
  nothing for unsigned ones. It is read from the environment when moto is imported.

State lives in moto's process-global backends: every LocalS3 in one process sees the same buckets.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

# moto accepts any credentials; explicit ones keep boto3 off the credential chain and instance metadata.
ADMIN_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"


def public_read_policy(bucket: str) -> dict[str, Any]:
    """The policy that makes a bucket behave like cellpainting-gallery: anonymous GET and LIST."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
             # moto checks HEAD against the made-up action s3:HeadObject (AWS uses s3:GetObject).
             "Action": ["s3:GetObject", "s3:HeadObject"], "Resource": [f"arn:aws:s3:::{bucket}/*"]},
            {"Sid": "PublicList", "Effect": "Allow", "Principal": "*",
             "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"]},
        ],
    }


def _client_config(unsigned: bool, max_pool: int) -> BotoConfig:
    return BotoConfig(
        signature_version=UNSIGNED if unsigned else None,
        region_name=REGION,
        s3={"addressing_style": "path"},
        max_pool_connections=max_pool,
        retries={"mode": "standard", "total_max_attempts": 3},
    )


def admin_client(endpoint_url: str, *, max_pool: int = 16):
    """A signed boto3 S3 client (owner rights in moto)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, config=_client_config(False, max_pool), **ADMIN_CREDENTIALS
    )


def anonymous_client(endpoint_url: str, *, max_pool: int = 16):
    """An unsigned boto3 S3 client, like `aws s3 --no-sign-request`."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=_client_config(True, max_pool))


def create_public_bucket(client, bucket: str) -> str:
    create_private_bucket(client, bucket)
    try:
        client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(public_read_policy(bucket)))
    except ClientError as exc:
        # rclone serve s3 has no bucket policies (it answers PutBucketPolicy with BucketAlreadyExists) and
        # serves everything anonymously already
        if exc.response.get("Error", {}).get("Code") not in ("NotImplemented", "501", "BucketAlreadyExists"):
            raise
    return bucket


def create_private_bucket(client, bucket: str) -> str:
    """A bucket whose objects anonymous GETs cannot read (403); anonymous LIST still works in moto."""
    try:
        client.create_bucket(Bucket=bucket)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass   # moto says the former, rclone the latter
    return bucket


class LocalS3:
    """`with LocalS3() as s3:` — moto's S3 API on 127.0.0.1, a free port, stopped on exit."""

    def __init__(self, host: str = "127.0.0.1"):
        self._server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
        self._endpoint_url: str | None = None

    def start(self) -> "LocalS3":
        # werkzeug logs every request to stderr; that drowns test output and costs time under load.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._endpoint_url is not None:
            self._server.stop()
            self._endpoint_url = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise RuntimeError("LocalS3 is not running: use `with LocalS3() as s3:` or call start()")
        return self._endpoint_url

    def client(self, *, unsigned: bool = False, max_pool: int = 16):
        if unsigned:
            return anonymous_client(self.endpoint_url, max_pool=max_pool)
        return admin_client(self.endpoint_url, max_pool=max_pool)

    def create_public_bucket(self, name: str) -> str:
        return create_public_bucket(self.client(), name)

    def create_private_bucket(self, name: str) -> str:
        return create_private_bucket(self.client(), name)
