"""A cluster on one machine, from Debian's packages: redis-server, haproxy (the front door), coturn
(TURN) and N avatar_rtc nodes, all on loopback. ``scripts/cluster.sh`` installs the packages first.

    python scripts/cluster.py up --nodes 2            # front door on http://127.0.0.1:8080
    python scripts/cluster.py status
    python scripts/cluster.py drain n1                # SIGTERM: live calls finish, then it exits
    python scripts/cluster.py down

The configuration it writes (haproxy.cfg under the run directory) is the one docs/deploy.md shows for
a cluster across hosts. tests/test_cluster.py starts its clusters with the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = Path(os.environ.get("AVATAR_RTC_CLUSTER_DIR", "/tmp/avatar-rtc-cluster"))
# How often haproxy checks each node (health and free capacity): a node killed outright stops getting
# requests after at most FALL checks (fail fast: a refused connection is immediate).
CHECK_INTERVAL_MS = 500
CHECK_FALL = 2
# Every node's configured weight: the agent's "ready N%" scales it (an integer weight of 1 would round
# every share but 100% down to nothing).
NODE_WEIGHT = 100


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    host: str
    port: int
    agent_port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(
    nodes: Iterable[NodeSpec],
    front_host: str,
    front_port: int,
    stats_socket: Path | None = None,
    check_interval_ms: int = CHECK_INTERVAL_MS,
) -> str:
    """The front door. New calls (POST /offer) go to a node with free slots: its agent's weight; a
    node that refuses one anyway (full or draining since its last check, or without Redis) answers 503
    and haproxy offers the call to another node. Session routes (/api/sessions/<node>.<id>/...) and
    node routes (/api/nodes/<node>/...) reach the node named in the path; the pages, the template
    API and everything else any node."""
    nodes = list(nodes)
    lines = [
        "global",
        "    maxconn 4096",
        # An SDP offer must fit in one buffer for haproxy to resend it to another node.
        "    tune.bufsize 65536",
    ]
    if stats_socket is not None:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 60s",
        # Uploads stream progress lines; a file render answers only when done (minutes, at worst).
        "    timeout server 300s",
        "    timeout http-request 15s",
        "    timeout http-keep-alive 15s",
        "    option http-server-close",
        "    retries 2",
        "    option redispatch 1",
        "",
        "frontend front_door",
        f"    bind {front_host}:{front_port}",
        # The nodes trust the first X-Forwarded-For entry (security.trust_forwarded_for): it must be
        # the caller's address as haproxy saw it, never one the caller wrote.
        "    http-request set-header X-Forwarded-For %[src]",
        "    default_backend avatar_nodes",
        "",
        "backend avatar_nodes",
        "    balance roundrobin",
        "    option httpchk GET /healthz",
        "    http-check expect status 200",
        # A refused offer (503) is safe to send again: the node made nothing for it. Other routes are
        # not retried past a connection failure (they are not all idempotent, and belong to one node).
        "    retry-on conn-failure empty-response 503",
        "    http-request disable-l7-retry unless { method POST } { path /offer }",
        "    http-error status 503 content-type application/json "
        'string \'{"error": "no node can take this request now; try again shortly"}\'',
        f"    default-server check inter {check_interval_ms}ms fall {CHECK_FALL} rise 2 "
        f"weight {NODE_WEIGHT} agent-check agent-inter {check_interval_ms}ms",
    ]
    for node in nodes:
        lines.append(
            f"    use-server {node.node_id} if {{ path_beg /api/sessions/{node.node_id}. }} "
            f"|| {{ path_beg /api/nodes/{node.node_id}/ }}"
        )
    for node in nodes:
        lines.append(f"    server {node.node_id} {node.host}:{node.port} agent-port {node.agent_port}")
    return "\n".join(lines) + "\n"


def redis_command(port: int, run_dir: Path) -> list[str]:
    # A cache, not a database: everything in it is rebuilt by heartbeats within seconds.
    return [
        "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(run_dir),
        "--logfile",
        str(run_dir / "redis.log"),
    ]


def coturn_command(port: int, secret: str, run_dir: Path, relay_ports: tuple[int, int]) -> list[str]:
    """coturn on loopback with the REST-API shared secret (use-auth-secret) the nodes mint from."""
    return [
        "turnserver",
        "-n",  # no configuration file: everything is here
        "--listening-ip=127.0.0.1",
        "--relay-ip=127.0.0.1",
        f"--listening-port={port}",
        f"--min-port={relay_ports[0]}",
        f"--max-port={relay_ports[1]}",
        "--use-auth-secret",
        f"--static-auth-secret={secret}",
        "--realm=avatar-rtc",
        "--fingerprint",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--no-multicast-peers",
        # Every peer is on loopback here; a deployment on real addresses leaves this out.
        "--allow-loopback-peers",
        f"--pidfile={run_dir / 'turnserver.pid'}",
        f"--log-file={run_dir / 'turnserver.log'}",
        "--simple-log",
    ]


def node_environment(
    node: NodeSpec,
    redis_url: str,
    cache_dir: Path,
    *,
    turn: tuple[str, str] | None = None,
    light: bool = True,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Settings for one node (AVATAR_RTC_...); ``turn``: (turn: URL, shared secret)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "AVATAR_RTC_CLUSTER__REDIS_URL": redis_url,
        "AVATAR_RTC_CLUSTER__NODE_ID": node.node_id,
        "AVATAR_RTC_CLUSTER__ADVERTISE": f"{node.host}:{node.port}",
        "AVATAR_RTC_CLUSTER__AGENT_HOST": node.host,
        "AVATAR_RTC_CLUSTER__AGENT_PORT": str(node.agent_port),
        # The front door's X-Forwarded-For is the caller's address (haproxy sets it, see above).
        "AVATAR_RTC_SECURITY__TRUST_FORWARDED_FOR": "true",
        "AVATAR_RTC_AVATAR__CACHE_DIR": str(cache_dir),
        "AVATAR_RTC_ICE_HOST_ADDRESSES": '["127.0.0.1"]',
    }
    if turn is not None:
        env["AVATAR_RTC_ICE_SERVERS"] = json.dumps([{"urls": [turn[0]]}])
        env["AVATAR_RTC_SECURITY__TURN_SECRET"] = turn[1]
    if light:
        # Text calls only: no speech recognition or language model to load per node.
        env["AVATAR_RTC_ASR__ENGINE"] = "none"
        env["AVATAR_RTC_LLM__ENGINE"] = "none"
    env.update(extra or {})
    return env


def node_command(node: NodeSpec) -> list[str]:
    return [sys.executable, "-m", "avatar_rtc.cli", "serve", "--host", node.host, "--port", str(node.port)]


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def wait_until_up(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http_status(url) == 200:
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with {process.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


def _exited(pid: int, process: subprocess.Popen[bytes] | None, wait_s: float) -> bool:
    """Whether the process has gone within ``wait_s``: our own child is waited for; one started by an
    earlier `up` (another parent) is polled."""
    if process is not None:
        try:
            process.wait(wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            # Exited, but its parent (the `up` that started it, now gone) never reaped it.
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


@dataclass
class LocalCluster:
    """The processes of one cluster under ``run_dir`` (pid files, logs, haproxy.cfg)."""

    run_dir: Path
    front_port: int
    redis_port: int
    turn_port: int
    nodes: list[NodeSpec]
    cache_dir: Path
    turn_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    @property
    def turn_url(self) -> str:
        return f"turn:127.0.0.1:{self.turn_port}"

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.run_dir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        (self.run_dir / f"{name}.pid").write_text(str(self.processes[name].pid))

    def start_redis(self) -> None:
        self._spawn("redis", redis_command(self.redis_port, self.run_dir))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.redis_port), 0.2):
                return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def start_turn(self) -> None:
        relay = (49160, 49200)
        self._spawn("turnserver", coturn_command(self.turn_port, self.turn_secret, self.run_dir, relay))

    def start_haproxy(self) -> None:
        config = self.run_dir / "haproxy.cfg"
        config.write_text(
            haproxy_config(self.nodes, "127.0.0.1", self.front_port, self.run_dir / "haproxy.sock")
        )
        subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
        self._spawn("haproxy", ["haproxy", "-db", "-f", str(config)])

    def start_node(self, node: NodeSpec, extra: dict[str, str] | None = None, light: bool = True) -> None:
        turn = (self.turn_url, self.turn_secret) if shutil.which("turnserver") else None
        env = node_environment(node, self.redis_url, self.cache_dir, turn=turn, light=light, extra=extra)
        self._spawn(node.node_id, node_command(node), env)

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        for node in self.nodes:
            wait_until_up(f"{node.url}/healthz", timeout_s, self.processes.get(node.node_id))

    def haproxy_status(self) -> dict[str, str]:
        """Each node's state as haproxy sees it (UP, DOWN, DRAIN, ...), from its stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.run_dir / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        status = lines[0].lstrip("# ").split(",").index("status")
        return {
            row[1]: row[status]
            for row in (line.split(",") for line in lines[1:] if line)
            if row[0] == "avatar_nodes" and row[1] != "BACKEND"
        }

    def send_signal(self, name: str, signum: int) -> None:
        process = self.processes.get(name)
        pid = process.pid if process is not None else int((self.run_dir / f"{name}.pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)

    def stop(self, name: str, signum: int = signal.SIGTERM, wait_s: float = 10) -> None:
        pid_file = self.run_dir / f"{name}.pid"
        process = self.processes.pop(name, None)
        pid = process.pid if process is not None else int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)
        if not _exited(pid, process, wait_s):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _exited(pid, process, 5)
        pid_file.unlink(missing_ok=True)

    def stop_all(self) -> None:
        # Nodes first and at once (SIGINT: no drain), then the front door, TURN and Redis.
        for name in [n.node_id for n in self.nodes] + ["haproxy", "turnserver", "redis"]:
            if name in self.processes or (self.run_dir / f"{name}.pid").exists():
                self.stop(
                    name, signal.SIGINT if name not in ("haproxy", "turnserver", "redis") else signal.SIGTERM
                )


def plan(
    run_dir: Path, nodes: int, front_port: int, base_port: int, cache_dir: Path | None = None
) -> LocalCluster:
    """Ports: front door ``front_port``; node i on ``base_port + i`` and its agent ``base_port + 100 + i``;
    Redis ``base_port + 200``; TURN ``base_port + 201``."""
    specs = [NodeSpec(f"n{i + 1}", "127.0.0.1", base_port + i, base_port + 100 + i) for i in range(nodes)]
    return LocalCluster(
        run_dir=run_dir,
        front_port=front_port,
        redis_port=base_port + 200,
        turn_port=base_port + 201,
        nodes=specs,
        cache_dir=cache_dir or (REPO_ROOT / "template_cache"),
    )


def _up(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if (run_dir / "cluster.json").exists():
        print(f"a cluster is already up under {run_dir} (scripts/cluster.sh down first)", file=sys.stderr)
        return 1
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = plan(run_dir, args.nodes, args.front_port, args.base_port, args.cache_dir)
    (run_dir / "cluster.json").write_text(
        json.dumps(
            {
                "front": cluster.front_url,
                "redis": cluster.redis_url,
                "turn": cluster.turn_url,
                "nodes": [n.__dict__ for n in cluster.nodes],
            },
            indent=2,
        )
    )
    try:
        cluster.start_redis()
        if shutil.which("turnserver"):
            cluster.start_turn()
        extra = {"AVATAR_RTC_CLUSTER__MAX_SESSIONS": str(args.max_sessions)} if args.max_sessions else {}
        # The first node prepares the shared default template; the others start once it is there.
        cluster.start_node(cluster.nodes[0], extra, light=not args.full)
        wait_until_up(f"{cluster.nodes[0].url}/healthz", 300, cluster.processes[cluster.nodes[0].node_id])
        for node in cluster.nodes[1:]:
            cluster.start_node(node, extra, light=not args.full)
        cluster.wait_for_nodes(300)
        cluster.start_haproxy()
        wait_until_up(f"{cluster.front_url}/healthz", 10, cluster.processes["haproxy"])
    except BaseException:
        cluster.stop_all()
        (run_dir / "cluster.json").unlink(missing_ok=True)
        raise
    print(f"front door  {cluster.front_url}  (call page: {cluster.front_url}/)")
    for node in cluster.nodes:
        print(f"node {node.node_id:<6} {node.url}  agent :{node.agent_port}")
    print(f"redis       {cluster.redis_url}")
    if "turnserver" in cluster.processes:
        print(f"coturn      {cluster.turn_url}  (REST credentials via GET /api/config)")
    print(f"logs        {run_dir}/*.log")
    return 0


def _load(run_dir: Path) -> LocalCluster:
    info = json.loads((run_dir / "cluster.json").read_text())
    nodes = [NodeSpec(**n) for n in info["nodes"]]
    return LocalCluster(
        run_dir=run_dir,
        front_port=int(info["front"].rsplit(":", 1)[1]),
        redis_port=int(info["redis"].rsplit(":", 1)[1].split("/")[0]),
        turn_port=int(info["turn"].rsplit(":", 1)[1]),
        nodes=nodes,
        cache_dir=REPO_ROOT / "template_cache",
    )


def _down(args: argparse.Namespace) -> int:
    if not (args.run_dir / "cluster.json").exists():
        print(f"no cluster under {args.run_dir}")
        return 0
    _load(args.run_dir).stop_all()
    (args.run_dir / "cluster.json").unlink()
    print("cluster stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    if not (args.run_dir / "cluster.json").exists():
        print(f"no cluster under {args.run_dir}")
        return 1
    cluster = _load(args.run_dir)
    print(f"front door {cluster.front_url}: {http_status(cluster.front_url + '/healthz') or 'down'}")
    try:
        seen = cluster.haproxy_status()
    except OSError:
        seen = {}
    for node in cluster.nodes:
        health = http_status(node.url + "/healthz") or "down"
        print(f"node {node.node_id} {node.url}: {health}, haproxy: {seen.get(node.node_id, '?')}")
    return 0


def _drain(args: argparse.Namespace) -> int:
    _load(args.run_dir).send_signal(args.node, signal.SIGTERM)
    print(f"{args.node}: draining (it exits once its calls have ended)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start redis-server, coturn, N nodes and haproxy")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--front-port", type=int, default=8080)
    up.add_argument("--base-port", type=int, default=8100, help="nodes on base, base+1, ...")
    up.add_argument("--max-sessions", type=int, default=0, help="sessions across the cluster (0: no limit)")
    up.add_argument("--cache-dir", type=Path, help="the shared template directory")
    up.add_argument("--full", action="store_true", help="nodes with speech recognition and the LLM")
    up.set_defaults(func=_up)
    commands.add_parser("down", help="stop everything").set_defaults(func=_down)
    commands.add_parser("status", help="what answers").set_defaults(func=_status)
    drain = commands.add_parser("drain", help="SIGTERM one node: it drains, then exits")
    drain.add_argument("node")
    drain.set_defaults(func=_drain)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
