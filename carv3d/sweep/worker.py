"""Worker process of the local backend: ``python -m carv3d.sweep.worker JOB.json RESULT.json``.

Reads a :class:`~carv3d.sweep.jobs.RunJob`, runs it on the devices its environment shows it
(``CUDA_VISIBLE_DEVICES`` is set by the parent), and writes the
:class:`~carv3d.sweep.state.RunResult` as JSON. A result file that is missing means the process died.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m carv3d.sweep.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI: never download weights at run time
    from carv3d.io import atomic_write_text
    from carv3d.log import logger, setup_logging
    from carv3d.sweep.jobs import RunJob, execute_job
    from carv3d.sweep.state import RunResult

    setup_logging()
    job = RunJob.from_dict(json.loads(Path(args[0]).read_text()))
    logger.info("sweep worker pid %d for %s: CUDA_VISIBLE_DEVICES=%s", os.getpid(), job.name,
                os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    code = 0
    try:
        result = execute_job(job)
    except KeyboardInterrupt:
        result, code = RunResult(job.name, "interrupted", "interrupted by Ctrl-C; re-run the sweep to resume"), 130
    atomic_write_text(args[1], json.dumps(result.to_dict()))
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
