"""python -m services.decoder: the model replica (prefill, drafting, verification, streaming)."""

from common.service_main import run_service
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings

if __name__ == "__main__":
    run_service("decoder", DecoderSettings, create_decoder_server)
