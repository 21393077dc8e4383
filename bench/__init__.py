"""`make bench` (`python -m bench`): cnnserve beside its physical limit and its peers.

One run on one machine measures, for lenet5, resnet18 and resnet50 (random
weights, exported into `.bench/repository`):

- (a) `raw`: onnxruntime called in-process, through the server's own Runner
  (so with the same session and thread settings), at each batch size;
- (b) `cnnserve`: the server with dynamic batching, at concurrency 1, 16, 64;
- (c) `unbatched`: the server with the same models and no dynamic_batching;
- (d) `echo`: a bare grpc.aio server that answers the same request bytes with
  the same response bytes and does nothing else: the Python gRPC floor;
- (e) `mlserver`: Seldon MLServer with adaptive batching and a minimal
  onnxruntime runtime, in its own virtual environment (`.bench/mlserver-venv`);
- (f) int8 variants (`<model>_int8`), when present in a repository;
- a GPU section, when onnxruntime's CUDA provider really runs.

Every server is driven by `cnnserve loadtest`'s engine over the same protocol,
with the same request bytes. The results go to `bench/results.json` and
`BENCHMARKS.md`; every figure there is a ratio against (a) or (d) of the same run.
"""
