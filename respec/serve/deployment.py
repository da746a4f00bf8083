"""The Ray Serve deployment: one replica holds the policy, its drafter and the engine loop,
and answers HTTP through the FastAPI app of `app.py`.

One replica per model copy: its engine batches every request the replica receives, so
Ray Serve's own request routing spreads load across replicas (`num_replicas`), each with
the CPUs/GPUs of `ServeOptions`. The ASGI app is built inside the replica
(`__serve_build_asgi_app__`), because its routes close over that replica's engine.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from respec.serve.app import build_api
from respec.serve.build import ServeOptions, build_service

# Many requests in flight per replica: they wait in the engine's queue for a free row,
# which is cheaper than Ray Serve holding them back (and keeps streams open meanwhile).
MAX_ONGOING = 1024


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
@serve.ingress()
class RespecServer:
    def __init__(self, options: ServeOptions) -> None:
        self.service = build_service(options)

    def __serve_build_asgi_app__(self):
        return build_api(self.service)

    def health(self) -> dict:
        """The engine's rows and counters, for a caller holding the deployment handle."""
        return self.service.health()


def application(options: ServeOptions, num_replicas: int = 1) -> Application:
    actor = {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus}
    return RespecServer.options(ray_actor_options=actor, num_replicas=num_replicas).bind(options)


def start(options: ServeOptions, host: str, port: int, route_prefix: str = "/", name: str = "respec",
          num_replicas: int = 1):
    """Deploy on the connected Ray cluster (ray.init done by the caller); returns the handle."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(options, num_replicas), name=name, route_prefix=route_prefix)
