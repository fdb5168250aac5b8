"""`huse serve`: an inference server with dynamic batching that speaks the Open Inference Protocol.

protocol (wire formats, pure functions) -> app (ASGI routes, auth, limits, metrics) -> batcher
(dynamic batching, no HTTP) -> models (what runs a batch, over Classifier). Importing this
package needs only the core; starting a server needs `pip install 'huse-edge[serve]'`.
"""

from huse.runtime.serve.app import ServeConfig, Server, create_app, load_server, serve
from huse.runtime.serve.batcher import Batcher, Instances, Overloaded
from huse.runtime.serve.protocol import RequestError

__all__ = ["Batcher", "Instances", "Overloaded", "RequestError", "ServeConfig", "Server", "create_app",
           "load_server", "serve"]
