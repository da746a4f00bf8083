from tests.runtime.conftest import run_graph  # noqa: F401  (the graph-running fixture)
