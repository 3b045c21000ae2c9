"""A real S3 endpoint for tests: moto's HTTP server on 127.0.0.1, reached by s3fs through AWS_ENDPOINT_URL.

Fixtures: `s3_endpoint` (session: starts the server, exports the endpoint and fake credentials in
os.environ so torchrun children inherit them) and `s3_bucket` (a fresh bucket, "s3://<name>").
`StoppableS3Server` is a second server that a test can stop and restart to simulate an outage.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # Never read the developer's own profile or credentials.
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "FSSPEC_S3_ENDPOINT_URL",
          "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET")


def clear_s3fs_cache() -> None:
    """Forget cached S3FileSystem instances (and so their listings)."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()


class StoppableS3Server:
    """A moto server whose `stop()` refuses every later request, restartable on the same port.

    moto's ThreadedMotoServer keeps HTTP/1.1 keep-alive connections served after `stop()`; this
    one speaks HTTP/1.0 (a connection per request) and closes its socket, so an outage is real.
    The S3 state lives in moto's in-process backends and survives a restart.
    """

    def __init__(self, port: int = 0):
        self.port = port
        self._server: Any = None  # a werkzeug server once started
        self._thread: threading.Thread | None = None

    def start(self) -> StoppableS3Server:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        handler = type("OneRequestPerConnection", (MotoRequestHandler,), {"protocol_version": "HTTP/1.0"})
        self._server = make_server("127.0.0.1", self.port, DomainDispatcherApplication(create_backend_app),
                                   threaded=True, request_handler=handler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port; the endpoint URL, exported for child processes."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    mp = pytest.MonkeyPatch()
    for name in _UNSET:
        mp.delenv(name, raising=False)
    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
        mp.setenv(name, value)
    clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        mp.undo()
        clear_s3fs_cache()
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh, empty bucket on the session's server: "s3://<name>"."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:16]}"
    clear_s3fs_cache()
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    clear_s3fs_cache()
