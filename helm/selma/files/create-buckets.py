"""Create selma's S3/MinIO bucket(s): the chart's post-install/post-upgrade hook Job runs this.

Reads the same SELMA_* settings as the services (endpoint, TLS, region, keys from the Secret) and
the bucket names from SELMA_BUCKETS (comma-separated). Idempotent: existing buckets are kept.
The endpoint may still be starting (MinIO is installed in the same release), so connection errors
are retried a bounded number of times; the Job's backoffLimit retries beyond that.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import S3Error

log = logging.getLogger("selma.create-buckets")


def _client() -> Minio:
    endpoint = os.environ.get("SELMA_S3_ENDPOINT", "")
    secure = os.environ.get("SELMA_S3_SECURE", "true").lower() in ("1", "true", "yes")
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        endpoint, secure = parts.netloc, parts.scheme == "https"
    if not endpoint:
        raise SystemExit("SELMA_S3_ENDPOINT is empty: set storage.s3.endpoint or minio.enabled")
    return Minio(
        endpoint,
        access_key=os.environ.get("SELMA_S3_ACCESS_KEY", ""),
        secret_key=os.environ.get("SELMA_S3_SECRET_KEY", ""),
        secure=secure,
        region=os.environ.get("SELMA_S3_REGION") or None,
        # The loop in main() retries; the client itself should fail fast on a refused connection.
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=30),
            retries=urllib3.Retry(total=1, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        ),
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    buckets = [b.strip() for b in os.environ.get("SELMA_BUCKETS", "").split(",") if b.strip()]
    if not buckets:
        log.error("SELMA_BUCKETS is empty: nothing to create")
        return 2
    attempts = int(os.environ.get("SELMA_BUCKET_ATTEMPTS", "30"))
    client = _client()
    for attempt in range(1, attempts + 1):
        try:
            for bucket in buckets:
                if client.bucket_exists(bucket):
                    log.info("bucket %s exists", bucket)
                else:
                    client.make_bucket(bucket, location=os.environ.get("SELMA_S3_REGION") or None)
                    log.info("bucket %s created", bucket)
            return 0
        except (S3Error, ValueError) as e:
            # Access denied or an invalid bucket name will not fix itself: fail with the reason.
            log.error("cannot create buckets %s: %s", ",".join(buckets), e)
            return 1
        except (urllib3.exceptions.HTTPError, OSError) as e:
            # Connection refused/reset while the endpoint starts: retry a bounded number of times.
            if attempt == attempts:
                log.error("S3 endpoint unreachable after %d attempts: %s", attempts, e)
                return 1
            log.info("S3 endpoint not reachable yet (%s); retry %d/%d", type(e).__name__, attempt, attempts)
            time.sleep(min(2.0 * attempt, 10.0))
    return 1


if __name__ == "__main__":
    sys.exit(main())
