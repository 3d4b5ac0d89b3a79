"""S3 access through boto3. Endpoint and credentials come from the standard AWS environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), never from files we commit.
Transient faults are retried by botocore (standard mode); what is still failing becomes a UserError."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pipeline.errors import UserError


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise UserError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{uri}: no bucket name (expected s3://BUCKET/KEY)")
    return bucket, key


@lru_cache(maxsize=4)
def _client(endpoint: str | None):
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                 s3={"addressing_style": "path"} if endpoint else {})
    return boto3.client("s3", endpoint_url=endpoint, config=cfg,
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def client():
    return _client(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _explain(uri: str, e: Exception) -> UserError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return UserError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(and AWS_ENDPOINT_URL for a non-AWS server)")
    if isinstance(e, EndpointConnectionError):
        return UserError(f"{uri}: S3 endpoint unreachable ({e}); check AWS_ENDPOINT_URL and the network")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "?")
        return UserError(f"{uri}: S3 error {code}: {e.response.get('Error', {}).get('Message', e)}")
    return UserError(f"{uri}: S3 request failed: {e}")


def list_keys(prefix_uri: str) -> list[str]:
    """All object URIs under an s3:// prefix, sorted."""
    bucket, prefix = split_uri(prefix_uri)
    try:
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []))
    except Exception as e:
        raise _explain(prefix_uri, e) from None


def read_bytes(uri: str) -> bytes:
    bucket, key = split_uri(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        raise _explain(uri, e) from None


def open_stream(uri: str):
    """A readable, non-seekable stream of the object (for tar archives read in one pass)."""
    bucket, key = split_uri(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as e:
        raise _explain(uri, e) from None


def upload_file(path: Path, uri: str) -> None:
    """S3 makes an object visible only once the upload completed: a reader never sees half a file."""
    bucket, key = split_uri(uri)
    try:
        client().upload_file(str(path), bucket, key)
    except Exception as e:
        raise _explain(uri, e) from None


def put_bytes(data: bytes, uri: str) -> None:
    bucket, key = split_uri(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as e:
        raise _explain(uri, e) from None


def exists(uri: str) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _explain(uri, e) from None
    except Exception as e:
        raise _explain(uri, e) from None
