"""python -m services.pool: draft pools in RocksDB, kept fresh from Kafka."""

from common.service_main import run_service
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings

if __name__ == "__main__":
    run_service("pool", PoolSettings, create_pool_server)
