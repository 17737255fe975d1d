"""``python -m sandboxes prepare [--provider NAME]``: make the host ready for sandboxes
(start the engine or the libvirt daemons, build every template's image), printing progress.
``python -m sandboxes build-image --template NAME``: build one template's VM image.
``make`` calls them so the first session does not wait for a build."""

from __future__ import annotations

import argparse
import asyncio
import logging

from config.settings import get_settings
from sandboxes.docker import engine_running, start_engine
from sandboxes.factory import make_gateway, make_provider
from sandboxes.libvirt import LibvirtProvider


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m sandboxes")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="ready the host and build every image")
    prepare.add_argument("--provider", choices=["docker", "libvirt"], help="default: settings'")
    build = commands.add_parser("build-image", help="build a template's VM image")
    build.add_argument("--template", required=True)
    args = parser.parse_args()
    settings = get_settings()
    if args.command == "build-image" or args.provider:
        provider_name = "libvirt" if args.command == "build-image" else args.provider
        settings = settings.model_copy(update={"sandbox_provider": provider_name})
    provider = make_provider(settings, make_gateway(settings))
    if isinstance(provider, LibvirtProvider) and args.command == "build-image":
        provider.build_image(args.template)
        return
    if settings.sandbox_provider == "docker" and not engine_running():
        print("starting the Docker engine", flush=True)
        start_engine(settings.data_dir / "logs" / "dockerd.log")
    print(f"preparing {provider.name} sandboxes (the first build takes a few minutes)", flush=True)
    asyncio.run(provider.prepare())
    print("sandboxes ready", flush=True)


if __name__ == "__main__":
    main()
