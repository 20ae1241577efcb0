"""TorchServe 0.12.0's gRPC stubs, generated from its own protos by :mod:`brst.train.serve.grpc_stubs`.

Do not edit: ``make grpc-stubs`` rewrites this package.
"""
TORCHSERVE_VERSION = "0.12.0"
