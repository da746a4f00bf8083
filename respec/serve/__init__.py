"""`respec serve`: the policy and its drafter behind an OpenAI-compatible HTTP endpoint.

- `engine_loop.py`: one SpeculativeEngine owned by one asyncio task; requests share its
  verification steps (continuous batching), a cancelled request's row is freed.
- `shape.py`: the draft shape per step, the Scheduler's rule or a fixed shape.
- `text.py`: incremental detokenization and stop strings.
- `protocol.py`: the OpenAI request bodies, their checks, the response bodies.
- `service.py`: requests -> engine -> responses (no HTTP); `app.py`: the FastAPI routes.
- `deployment.py`: the Ray Serve deployment and `respec serve`'s start-up.
"""
