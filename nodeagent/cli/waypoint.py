"""`nodeagent waypoint`: run a waypoint (the L7 proxy a namespace's services go through).

It terminates HBONE on 15008 with its own SPIFFE identity (`--namespace`,
`--service-account`, default the waypoint's name), takes workloads, services,
policies and VirtualServices/DestinationRules over delta xDS, reads the HTTP
inside each tunnel and routes every request by the service's HTTP routes.
Settings as `nodeagent run` (file, environment, flags); `--node-name` is the
node it runs on (its token authorizes that node's identities).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

from nodeagent.cli.errors import CliError
from nodeagent.cli.run import event_loop_runner, load_config, setup_logging, tune_data_path
from nodeagent.config import ConfigError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "waypoint",
        help="run a waypoint: HBONE in, HTTP routing per request, HBONE out",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    p.add_argument("--name", required=True, help="the waypoint's name (a Gateway's)")
    p.add_argument("--namespace", required=True, help="the waypoint's namespace")
    p.add_argument("--service-account", default="", help="its service account (default: NAME)")
    p.add_argument("--listen", default="0.0.0.0:15008", help="HBONE listen address")
    p.add_argument("--metrics-address", help="metrics and readiness address (default :15020)")
    p.add_argument("--config", metavar="FILE", help="YAML settings file")
    p.add_argument("--node-name", help="node the waypoint runs on (env NODE_NAME)")
    p.add_argument("--xds-address", help="control plane, http(s)://host:port")
    p.add_argument("--xds-root-ca", metavar="FILE", help="root CA of the control plane")
    p.add_argument("--ca-address", help="certificate authority (default: the xDS address)")
    p.add_argument("--auth-token-path", metavar="FILE", help="bearer token file")
    p.add_argument("--trust-domain", help="SPIFFE trust domain")
    p.add_argument("--log-level", help="trace, debug, info (default), warning, error")
    p.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> None:
    from nodeagent import app

    config = load_config(args)
    if args.metrics_address:
        from dataclasses import replace

        config = replace(config, metrics_address=args.metrics_address)
    settings = app.WaypointSettings(
        name=args.name,
        namespace=args.namespace,
        service_account=args.service_account,
        listen=args.listen,
    )
    tune_data_path()
    waypoint = app.build_waypoint(config, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, waypoint.stop)
    await waypoint.run()


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    setup_logging(config.log_level)
    try:
        with event_loop_runner() as runner:
            runner.run(serve(args))
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # a listener's port in use, an address not on this host
        raise CliError(f"waypoint {args.namespace}/{args.name}: {exc.strerror or exc}") from None
    return 0
