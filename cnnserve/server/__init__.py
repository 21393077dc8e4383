"""The gRPC service: transport (servicer, converters) → registry → batcher → runner.

A request's journey: `servicer` decodes and validates it, `registry` finds the
ready model version, its `batcher` joins it with others into one batch, a
`runner` executes the batch on onnxruntime in its own thread, and the rows are
split back to each caller. `app` wires these together with health, reflection
and metrics.
"""
