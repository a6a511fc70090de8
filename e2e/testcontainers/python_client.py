"""testcontainers-python against Berth's docker-shim, configured by
DOCKER_HOST alone (Ryuk on, as by default).

    python_client.py run IMAGE       log wait, port reached from the host,
                                     exec, two containers on a network
    python_client.py abandon IMAGE   start a container, print its ID and
                                     die without cleaning up (Ryuk must)
    python_client.py bench IMAGE     for each line on stdin, start a
                                     container to ready (a log wait), print
                                     the milliseconds that took, remove it
"""

import os
import sys
import time
import urllib.request

from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.wait_strategies import HttpWaitStrategy, LogMessageWaitStrategy

SERVE = "mkdir -p /www && echo pong > /www/index.html && echo ready && exec httpd -f -p 8080 -h /www"


def server(image):
    return DockerContainer(image).with_command(["sh", "-c", SERVE]).with_exposed_ports(8080)


def run(image):
    web = server(image).waiting_for(LogMessageWaitStrategy("ready"))
    with web:
        host, port = web.get_container_host_ip(), web.get_exposed_port(8080)
        body = urllib.request.urlopen(f"http://{host}:{port}/", timeout=10).read()
        assert body == b"pong\n", body
        result = web.exec(["sh", "-c", "echo hi; exit 4"])
        assert (result.exit_code, result.output) == (4, b"hi\n"), result
    print("log wait, port and exec: ok", flush=True)

    with Network() as net:
        db = server(image).with_network(net).with_network_aliases("db")
        with db.waiting_for(HttpWaitStrategy(8080)):
            client = DockerContainer(image).with_network(net)
            client.with_command(["wget", "-qO-", "http://db:8080/"])
            with client:
                status = client.get_wrapped_container().wait(timeout=60)
                out, err = client.get_logs()
                assert (status["StatusCode"], out) == (0, b"pong\n"), (status, out, err)
    print("network alias: ok", flush=True)
    print("OK", flush=True)


def abandon(image):
    c = DockerContainer(image).with_command(["sleep", "600"])
    c.start()
    print(c.get_wrapped_container().id, flush=True)
    # No cleanup, no atexit: as if the test process crashed.
    os._exit(0)


def bench(image):
    def ready():
        c = DockerContainer(image).with_command(["sh", "-c", "echo ready; exec sleep 600"])
        return c.waiting_for(LogMessageWaitStrategy("ready"))

    # Ryuk and the client's own set-up are not part of any run.
    with ready():
        pass
    print("warm", flush=True)
    for _ in sys.stdin:
        c = ready()
        start = time.monotonic()
        c.start()
        took = (time.monotonic() - start) * 1000
        c.stop()
        print(f"{took:.1f}", flush=True)


if __name__ == "__main__":
    {"run": run, "abandon": abandon, "bench": bench}[sys.argv[1]](sys.argv[2])
