"""Demo actors: a small graph that exercises the runtime end to end (make run, tests, bench)."""
