"""python -m services.router: the entry point for the ads ranking service."""

from common.service_main import run_service
from services.router.server import create_router_server
from services.router.settings import RouterSettings

if __name__ == "__main__":
    run_service("router", RouterSettings, create_router_server)
