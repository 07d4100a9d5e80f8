"""python -m services.kvstore: block KV caches (an LRU memory tier over RocksDB)."""

from common.service_main import run_service
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings

if __name__ == "__main__":
    run_service("kvstore", KvStoreSettings, create_kvstore_server)
