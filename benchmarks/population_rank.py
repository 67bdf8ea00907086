"""One real fed_ddp rank (``fed_ddp.train.main``, unchanged) that writes its peak resident memory at exit.

Launched by ``benchmarks/population.py`` through torch's elastic launcher; writes
``$FED_DDP_BENCH_DIR/rss_rank<R>.json`` = {"rank": R, "peak_rss_mib": ...} (``getrusage``'s ru_maxrss).
"""

import json
import os
import resource
import sys

from fed_ddp import train

if __name__ == "__main__":
    rc = train.main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.environ["FED_DDP_BENCH_DIR"], f"rss_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "peak_rss_mib": peak}, f)
    sys.exit(rc)
