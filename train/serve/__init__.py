"""``brst-train archive | serve | predict``: the .mar builder, the TorchServe process, HTTP/gRPC clients."""
