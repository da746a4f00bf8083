"""Where FastRollouts' time goes between its batches, from a run's log (respec/bench/batch_gaps.py).

    python3 bench/batch_gaps.py LOG.jsonl [LOG.jsonl ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec.bench.batch_gaps import main  # noqa: E402

if __name__ == "__main__":
    main()
