"""`sockwatch serve`: the long-running agent systemd and Kubernetes run."""

from __future__ import annotations

import os
from typing import Any

import typer
from typer._click.core import ParameterSource

from sockwatch.agent.protocol import DEFAULT_SOCKET
from sockwatch.cli import args
from sockwatch.cli.errors import EXIT_RUNTIME, EXIT_USAGE, fail, friendly
from sockwatch.metric_limits import DEFAULT_PORT as DEFAULT_METRICS_PORT
from sockwatch.metric_limits import DROPPABLE, MAX_DESTINATIONS, MAX_LISTENERS, MAX_LOOKUPS, Limits


def _param(key: str) -> str:
    """A config-file key's parameter name."""
    return "socket_path" if key == "socket" else key.replace("-", "_")


# what each flag's value is, as --help shows it
METAVARS = {
    "--config": "FILE", "--socket": "PATH", "--reconcile-interval": "SECONDS", "--max-udp": "N",
    "--ringbuf-pages": "PAGES", "--max-lookup-keys": "N", "--max-udp-peers": "N", "--max-lookup-namespaces": "N",
    "--lookups": "on|off", "--listen": "[ADDR]:PORT|off", "--web-config": "FILE", "--metrics-max-listeners": "N",
    "--telemetry-path": "PATH",
    "--metrics-max-destinations": "N", "--metrics-max-lookups": "N", "--metrics-drop-label": "LABEL",
    "--metrics-keep-label": "LABEL", "--cgroup-root": "DIR", "--kubelet-log-dir": "DIR", "--stream-cpu": "PERCENT",
    "--log-level": "debug|info|warn|error", "--log-format": "text|logfmt|json",
}  # fmt: skip


# --help groups the flags in panels (at 80 columns a single list of 20 is ~230 lines)
PANELS = {
    "--config": "Where it answers", "--socket": "Where it answers", "--listen": "Where it answers",
    "--web-config": "Where it answers", "--telemetry-path": "Where it answers",
    "--metrics-max-listeners": "Metrics", "--metrics-max-destinations": "Metrics", "--metrics-max-lookups": "Metrics",
    "--metrics-drop-label": "Metrics", "--metrics-keep-label": "Metrics",
    "--log-level": "Logs", "--log-format": "Logs",
}  # fmt: skip


# The same flags under the names exporters use (node_exporter's --web.*, --log.*): taken
# as the flag itself before parsing (listed as aliases, --help would cut both at 80 columns)
EXPORTER_SPELLINGS = {
    "--web.listen-address": "--listen", "--web.config.file": "--web-config",
    "--web.telemetry-path": "--telemetry-path", "--log.level": "--log-level", "--log.format": "--log-format",
}  # fmt: skip


def exporter_spellings(argv: list[str]) -> list[str]:
    """`sockwatch serve ...` arguments with the exporters' spellings (--web.listen-address
    :9847, --log.level=debug) as sockwatch's own flags; anything after `--` left alone."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if a == "--":
            return out + argv[i:]
        name, eq, value = a.partition("=")
        out.append(EXPORTER_SPELLINGS.get(name, name) + eq + value if name in EXPORTER_SPELLINGS else a)
    return out


def _opt(default: object, flag: str, help: str, hidden: bool = False) -> Any:
    """A serve flag, also read from SOCKWATCH_<FLAG> and from the config file (said once in
    the command's help, not per flag: the names would be cut at 80 columns)."""
    return typer.Option(default, flag, help=help, envvar="SOCKWATCH_" + flag[2:].upper().replace("-", "_"),
                        show_envvar=False, hidden=hidden, metavar=METAVARS[flag],
                        rich_help_panel=PANELS.get(flag, "Tables and hooks"))  # fmt: skip


def serve(
    ctx: typer.Context,
    config: str = _opt(
        "",
        "--config",
        'A TOML file with these settings (one key per flag: listen = "0.0.0.0:9847"); '
        "flags and SOCKWATCH_* variables win over it.",
    ),
    socket_path: str = _opt(DEFAULT_SOCKET, "--socket", "Where to answer queries (root-only)."),
    reconcile_interval: str = _opt(
        "30",
        "--reconcile-interval",
        "Seconds between full comparisons with the kernel's tables, 1 to 86400 (stretched to stay under 0.5% CPU).",
    ),
    max_udp: str = _opt(
        "65536",
        "--max-udp",
        "No longer used (UDP sockets are read from the kernel when asked: no BPF table to size); accepted, checked "
        "and ignored, so that older configurations still start.",
        hidden=True,
    ),
    ringbuf_pages: str = _opt(
        "1024",
        "--ringbuf-pages",
        "Ring buffer size in 4 KiB pages: a power of two, 16 to 65536 (mapped twice: RSS counts it double).",
    ),
    max_lookup_keys: str = _opt(
        "16384",
        "--max-lookup-keys",
        "Destinations (namespace, protocol, address, port) whose socket lookups are counted, 1024 to 1048576 "
        "(per CPU: 16 bytes each; lookups past it are counted as uncounted).",
    ),
    max_udp_peers: str = _opt(
        "16384",
        "--max-udp-peers",
        "Remote peers of unconnected UDP sockets kept (least recently seen go first), 1024 to 1048576; "
        "0 leaves the peer map out.",
    ),
    max_lookup_namespaces: str = _opt(
        "512",
        "--max-lookup-namespaces",
        "Network namespaces given the sk_lookup hook (one BPF program each, ~8 KiB of kernel memory; any user "
        "can make namespaces), 1 to 65536; the rest are in the table, their lookups not counted.",
    ),
    lookups: str = _opt(
        "on",
        "--lookups",
        "The sk_lookup hook in every network namespace (lookups, closed ports probed, UDP peers): on or off. "
        "It costs UDP floods most (docs/benchmarks.md).",
    ),
    listen: str = _opt(
        f"127.0.0.1:{DEFAULT_METRICS_PORT}",
        "--listen",
        "Where to serve /metrics and /healthz: "
        "ADDR:PORT ([ADDR]:PORT for IPv6; :PORT for every address, IPv4 and IPv6; port 0 picks a free one), "
        "or 'off'. Loopback by default: the metrics name processes and addresses. Also --web.listen-address.",
    ),
    web_config: str = _opt(
        "",
        "--web-config",
        "TLS, basic auth and a rate limit for /metrics, in the Prometheus exporters' web config file format "
        "(exporter-toolkit's: tls_server_config, basic_auth_users, http_server_config, rate_limit), read again when "
        "it or a file it names changes. Also --web.config.file.",
    ),
    telemetry_path: str = _opt(
        "/metrics",
        "--telemetry-path",
        "The path the metrics are served at. Also --web.telemetry-path.",
    ),
    metrics_max_listeners: str = _opt(
        str(MAX_LISTENERS),
        "--metrics-max-listeners",
        "At most this many sockwatch_listener_info series, 0 to 100000 (the cut is counted).",
    ),
    metrics_max_destinations: str = _opt(
        str(MAX_DESTINATIONS),
        "--metrics-max-destinations",
        "At most this many worst ephemeral-port destinations, 0 to 10000.",
    ),
    metrics_max_lookups: str = _opt(
        str(MAX_LOOKUPS),
        "--metrics-max-lookups",
        "At most this many series in each socket-lookup family (lookups, misses, UDP peers), 0 to 100000; "
        "the rest are summed as 'other'.",
    ),
    metrics_drop_label: list[str] = _opt(
        [],
        "--metrics-drop-label",
        f"Leave this label out (its series are summed); repeatable. One of: {', '.join(sorted(DROPPABLE))}.",
    ),
    metrics_keep_label: list[str] = _opt(
        [],
        "--metrics-keep-label",
        "Keep only these of the labels --metrics-drop-label could drop (an allow list); repeatable.",
    ),
    cgroup_root: str = _opt(
        "",
        "--cgroup-root",
        "The cgroup v2 mount to attach to (default: the first one). In a "
        "container with its own cgroup namespace, where the host's hierarchy is mounted.",
    ),
    kubelet_log_dir: str = _opt(
        "/var/log",
        "--kubelet-log-dir",
        "Where the kubelet writes pods/ and containers/: pod and container names come from there.",
    ),
    stream_cpu: str = _opt(
        "25",
        "--stream-cpu",
        "Percent of one CPU the event stream may take while someone "
        "subscribes, 1 to 100; past it, records are skipped for the stream and subscribers are "
        "told how many.",
    ),
    log_level: str = _opt("warn", "--log-level", "What to log: debug, info, warn or error. Also --log.level."),
    log_format: str = _opt(
        "text",
        "--log-format",
        "How log lines look: text (sockwatch: message), logfmt or json, as exporters write them. Also --log.format.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the agent does (--log-level info)."),
) -> None:
    """Run the agent: load the BPF programs once, keep the socket table live, and
    answer local queries on a root-only unix socket.

    `snapshot`, `status`, `events`, `live` and `ports` ask it. Everything is attached
    through BPF links: when the agent exits, however it exits, the kernel detaches it
    all. A kernel that refuses one hook runs without it (degraded, and every answer
    says so). One agent per socket path.

    Every flag is also an environment variable, SOCKWATCH_ and the flag's name
    (SOCKWATCH_RECONCILE_INTERVAL), and a key of --config's file (reconcile-interval);
    flags win over variables, variables over the file.

    Examples:

        sudo sockwatch serve

        sudo sockwatch serve --socket /run/sockwatch/agent.sock --ringbuf-pages 16384

        sudo sockwatch serve --config /etc/sockwatch/sockwatch.toml
    """
    from sockwatch import logs as log_lines  # (these: not for every command's start-up, --help's included)
    from sockwatch.agent import sockpath, webconfig
    from sockwatch.agent.loop import Agent, Settings
    from sockwatch.cli import config as cfg
    from sockwatch.kernel import prereq

    given = {
        "socket": socket_path, "reconcile-interval": reconcile_interval, "max-udp": max_udp,
        "ringbuf-pages": ringbuf_pages, "max-lookup-keys": max_lookup_keys, "max-udp-peers": max_udp_peers,
        "lookups": lookups, "max-lookup-namespaces": max_lookup_namespaces,
        "listen": listen, "web-config": web_config, "telemetry-path": telemetry_path,
        "metrics-max-listeners": metrics_max_listeners, "metrics-max-destinations": metrics_max_destinations,
        "metrics-max-lookups": metrics_max_lookups,
        "metrics-drop-label": metrics_drop_label, "metrics-keep-label": metrics_keep_label,
        "cgroup-root": cgroup_root, "kubelet-log-dir": kubelet_log_dir, "stream-cpu": stream_cpu,
        "log-level": log_level, "log-format": log_format,
    }  # fmt: skip
    try:
        if config:
            from_file = cfg.load(config, {k for k, v in given.items() if isinstance(v, str)},
                                 {k for k, v in given.items() if isinstance(v, list)})  # fmt: skip
            for key, value in from_file.items():
                if ctx.get_parameter_source(_param(key)) == ParameterSource.DEFAULT:
                    given[key] = value
        g = {k: v for k, v in given.items() if isinstance(v, str)}
        socket_path = sockpath.validate(g["socket"])
        interval = args.seconds(g["reconcile-interval"], "--reconcile-interval", 1, 86400)
        args.integer(g["max-udp"], "--max-udp", 1024, 16_777_216)  # ignored, but still not any text
        pages = args.integer(g["ringbuf-pages"], "--ringbuf-pages", 16, 65536)
        lookup_keys = args.integer(g["max-lookup-keys"], "--max-lookup-keys", 1024, 1 << 20)
        udp_peers = args.integer(g["max-udp-peers"], "--max-udp-peers", 0, 1 << 20)
        lookup_namespaces = args.integer(g["max-lookup-namespaces"], "--max-lookup-namespaces", 1, 65536)
        if udp_peers and udp_peers < 1024:
            raise args.ArgError(f"--max-udp-peers {udp_peers} is out of range: 0 (off) or 1024 to 1048576")
        if g["lookups"] not in ("on", "off"):
            raise args.ArgError(f"--lookups must be on or off, not {g['lookups'][:20]!r}")
        stream_share = args.integer(g["stream-cpu"], "--stream-cpu", 1, 100) / 100
        level = "info" if verbose and g["log-level"] == "warn" else g["log-level"]
        if level not in log_lines.LEVELS:
            raise args.ArgError(
                f"--log-level must be one of {', '.join(log_lines.LEVELS)}, not {g['log-level'][:20]!r}"
            )
        if g["log-format"] not in log_lines.FORMATS:
            raise args.ArgError(
                f"--log-format must be one of {', '.join(log_lines.FORMATS)}, not {g['log-format'][:20]!r}"
            )
        where = args.listen_address(g["listen"], "--listen")
        limits = Limits(
            listeners=args.integer(g["metrics-max-listeners"], "--metrics-max-listeners", 0, 100_000),
            destinations=args.integer(g["metrics-max-destinations"], "--metrics-max-destinations", 0, 10_000),
            lookups=args.integer(g["metrics-max-lookups"], "--metrics-max-lookups", 0, 100_000),
            drop_labels=args.choices(given["metrics-drop-label"], "--metrics-drop-label", DROPPABLE)
            | (
                DROPPABLE - args.choices(given["metrics-keep-label"], "--metrics-keep-label", DROPPABLE)
                if given["metrics-keep-label"]
                else frozenset()
            ),
        )
        logs = args.directory(g["kubelet-log-dir"], "--kubelet-log-dir")
        if g["cgroup-root"]:
            os.environ[prereq.CGROUP_ROOT_ENV] = args.directory(g["cgroup-root"], "--cgroup-root")
        web = webconfig.load(g["web-config"]) if g["web-config"] else None
        path = args.url_path(g["telemetry-path"], "--telemetry-path")
    except (sockpath.PathError, args.ArgError, cfg.ConfigError, webconfig.WebConfigError) as e:
        raise fail(str(e), code=EXIT_USAGE) from None
    if pages & (pages - 1):
        raise fail(f"--ringbuf-pages {pages} is not a power of two", "use 256, 1024, 4096, ...", EXIT_USAGE)
    log_lines.setup(level, g["log-format"])
    agent = Agent(
        Settings(socket_path, interval, ringbuf_pages=pages, max_lookup_keys=lookup_keys,
                 max_udp_peers=udp_peers, lookups=g["lookups"] == "on", max_lookup_namespaces=lookup_namespaces,
                 stream_cpu=stream_share, listen=where,
                 metrics_limits=limits, kubelet_log_dir=logs, web=web,
                 web_config_path=g["web-config"], telemetry_path=path)
    )  # fmt: skip
    with friendly():
        try:
            agent.start()
        except sockpath.AgentRunning as e:
            agent.close()
            raise fail(str(e), "query it (sockwatch snapshot), or stop it first", EXIT_RUNTIME) from None
        except sockpath.ListenError as e:
            agent.close()
            raise fail(str(e), "choose another --listen address, or --listen off", EXIT_USAGE) from None
        except sockpath.PathError as e:
            agent.close()
            raise fail(str(e), "choose another --socket path", EXIT_USAGE) from None
        except sockpath.PathUnusable as e:
            agent.close()
            raise fail(str(e), "free space there, or choose another --socket path", EXIT_RUNTIME) from None
        except BaseException:
            agent.close()
            raise
        typer.echo(
            f"sockwatch: serving {len(agent.tracker.rows)} sockets on {socket_path}"
            + (f", metrics on {agent.metrics_url()}" if agent.metrics_address else "")
            + " "
            f"(BPF loaded in {agent.load_seconds:.2f}s)",
            err=True,
        )
        try:
            agent.run()
        finally:
            agent.close()
