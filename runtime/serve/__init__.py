"""`huse serve`: an inference server with dynamic batching that speaks the Open Inference Protocol.

Two processes. The HTTP front: protocol (wire formats, pure functions) -> app (ASGI routes, auth,
limits, admission, metrics). The model process: worker (the socket pair between the two, and the
model process's main) -> batcher (dynamic batching, no HTTP) -> models (what runs a batch, over
Classifier). page, review and thumbs are the web page's routes, in the front. Importing this
package needs only the core; starting a server needs `pip install 'huse-edge[serve]'`.
"""

from huse.runtime.serve.app import ServeConfig, Server, create_app, load_server, serve
from huse.runtime.serve.batcher import Batcher, Instances, Overloaded
from huse.runtime.serve.protocol import RequestError

__all__ = ["Batcher", "Instances", "Overloaded", "RequestError", "ServeConfig", "Server", "create_app",
           "load_server", "serve"]
