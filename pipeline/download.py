"""Stage 1, download: fetch the four MNIST IDX files from the first mirror that serves valid data.

A mirror may serve each file gzipped (`<name>.gz`) or plain (`<name>`). Whatever it serves is
accepted only when the SHA-256 of the decompressed bytes matches the pinned value, so any mirror,
however untrusted, can only give us the real MNIST or an error.
"""

import gzip
import hashlib
import io
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from pipeline.config import DownloadConfig, run_stage
from pipeline.data_io import IDX_FILES, IDX_SIZE_AND_SHA256, RAW_DIR, atomic_write_bytes
from pipeline.errors import PipelineError

CHUNK_BYTES = 1 << 18


def download(config: DownloadConfig) -> None:
    mirrors = mirror_list(config.mirrors)
    # All four verified before any is written: a failure leaves no partial data/raw.
    files = {name: fetch_verified(name, mirrors, config.timeout_seconds) for name in IDX_FILES.values()}
    for name, data in files.items():
        atomic_write_bytes(RAW_DIR / name, data)


def mirror_list(configured: list[str]) -> list[str]:
    """MNIST_MIRROR first when set, then the configured mirrors; each as a URL ending in '/'."""
    mirrors = [os.environ["MNIST_MIRROR"]] if os.environ.get("MNIST_MIRROR") else []
    mirrors += configured
    urls = []
    for mirror in mirrors:
        if "://" not in mirror:  # a local directory
            mirror = Path(mirror).expanduser().resolve().as_uri()
        urls.append(mirror if mirror.endswith("/") else mirror + "/")
    return urls


def fetch_verified(name: str, mirrors: list[str], timeout_seconds: float) -> bytes:
    failures = []
    for mirror in mirrors:
        try:
            return fetch_from_mirror(name, mirror, timeout_seconds)
        except (PipelineError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            failures.append(f"{mirror} ({reason})")
            print(f"download: {name} from {mirror} failed ({reason}); trying the next mirror", file=sys.stderr)
    raise PipelineError(
        f"no mirror served a valid {name}; tried: {'; '.join(failures) or 'none configured'}. "
        "Set MNIST_MIRROR to a directory or URL holding the MNIST IDX files, or fix download.mirrors"
    )


def fetch_from_mirror(name: str, mirror: str, timeout_seconds: float) -> bytes:
    expected_size, _ = IDX_SIZE_AND_SHA256[name]
    for candidate in (f"{name}.gz", name):
        url = urllib.parse.urljoin(mirror, candidate)
        try:
            payload = read_url(url, timeout_seconds, limit=expected_size + 1)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                continue  # try the plain file, or the next mirror
            raise
        except urllib.error.URLError as error:
            if isinstance(error.reason, FileNotFoundError):  # a file:// mirror without this name
                continue
            raise
        return verify(name, payload)
    raise PipelineError(f"neither {name}.gz nor {name} found")


def read_url(url: str, timeout_seconds: float, limit: int) -> bytes:
    """Reads at most `limit` bytes, reporting progress on a terminal and one line otherwise."""
    started = time.monotonic()
    buffer = bytearray()
    with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        from tqdm import tqdm

        with tqdm(
            total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False, disable=not sys.stderr.isatty()
        ) as progress:
            while chunk := response.read(CHUNK_BYTES):
                buffer += chunk
                progress.update(len(chunk))
                if len(buffer) > limit:
                    raise PipelineError(f"{url} is larger than the real file ({limit - 1} bytes)")
    elapsed = time.monotonic() - started
    print(f"download: {url} {len(buffer) / 1e6:.1f} MB in {elapsed:.1f} s", file=sys.stderr)
    return bytes(buffer)


def verify(name: str, payload: bytes) -> bytes:
    """Decompresses when gzipped and checks size and SHA-256 of the result."""
    expected_size, expected_sha256 = IDX_SIZE_AND_SHA256[name]
    data = payload
    if payload[:2] == b"\x1f\x8b":
        try:
            # Read one byte past the expected size, so a gzip bomb cannot fill memory.
            data = gzip.GzipFile(fileobj=io.BytesIO(payload)).read(expected_size + 1)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise PipelineError(f"corrupt or truncated gzip ({error})") from None
    actual_sha256 = hashlib.sha256(data).hexdigest()
    if actual_sha256 != expected_sha256:
        looks_like = " (it looks like an HTML page, not data)" if data.lstrip()[:1] == b"<" else ""
        raise PipelineError(
            f"checksum mismatch{looks_like}: SHA-256 {actual_sha256[:16]}..., "
            f"expected {expected_sha256[:16]}... ({len(data)} of {expected_size} bytes)"
        )
    return data


if __name__ == "__main__":
    run_stage(download, "download")
