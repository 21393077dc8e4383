"""A minimal onnxruntime runtime for Seldon MLServer: the peer in `make bench`.

It runs inside MLServer's own virtual environment (`.bench/mlserver-venv`),
never in cnnserve's, and is copied beside the model settings it serves. The
session gets the same options as cnnserve's runner: the config's intra- and
inter-op threads, spinning off. MLServer's adaptive batching (max_batch_size,
max_batch_time in model-settings.json) stacks requests along the first axis
before `predict` and splits the answer after it.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        parameters = self.settings.parameters
        extra = (parameters.extra if parameters is not None else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", 0))
        options.inter_op_num_threads = int(extra.get("inter_op_threads", 0))
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        uri = parameters.uri if parameters is not None else None
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
