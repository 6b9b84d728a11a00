"""ckfsd's gRPC services: one async (trio) class per protobuf service.

Each module holds a class whose methods are named like the service's RPCs
(``async def Stat(self, request, call)``; server-streaming RPCs are async
generators; client- and bidi-streaming RPCs take an async iterator of
requests). `ckfs.services.bridge` serves such a class through grpcio, so the
services themselves never see a thread or a grpc object.
"""
