"""The Router's generated gRPC stubs (common_pb2, router_pb2, router_pb2_grpc), written here by the
build hook (setup.py) from the repository's protos/adaccel/v1; never checked in, never edited."""
