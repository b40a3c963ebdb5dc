"""Generated gRPC stubs for ``protos/`` (see ``generate.py``)."""

__all__ = ["ingest_pb2", "ingest_pb2_grpc"]
