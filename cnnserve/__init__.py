"""cnnserve: classic CNNs served over the Open Inference Protocol on onnxruntime.

Subpackages: `export` (PyTorch → verified ONNX model repository), `server`
(the gRPC service), `client` (Python client, CLI commands, load generator)
and `v1` (generated protobuf code).
"""

__version__ = "0.1.0"
