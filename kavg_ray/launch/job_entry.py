"""The entrypoint of a submitted sweep's Ray Job, on the head node.

``python -m kavg_ray.launch.job_entry --storage DIR --name NAME [--resume]`` writes the
spec from ``$KAVG_SWEEP_SPEC`` to a temporary ``spec.yaml`` and runs
``kavg sweep run spec.yaml --address auto ...`` on it. A module of its own, so that the
job commands (:mod:`kavg_ray.launch.jobs`) and the command line do not import each other.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path

from kavg_ray.launch.jobs import RESUME_ENV, SPEC_ENV, SPEC_NAME


def main(argv: list[str] | None = None) -> None:
    """Spec from $KAVG_SWEEP_SPEC, then `kavg sweep run` on it."""
    from kavg_ray.cli import main as cli_main
    from kavg_ray.launch.sweep import job_env_vars

    argv = sys.argv[1:] if argv is None else argv
    # A job submitted with --working-dir starts inside Ray's unpacked copy of that folder,
    # which Ray may remove once the trials' workers that shared it have exited: Tune then
    # fails at the end of the sweep resolving paths against a vanished cwd. The folder
    # stays importable (Ray puts it on PYTHONPATH); the driver works from the home folder.
    os.chdir(Path.home())
    text = os.environ.get(SPEC_ENV)
    if not text:
        print(f"error: ${SPEC_ENV} is empty: submit with 'kavg sweep submit'", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory(prefix="kavg-job-") as folder:
        path = os.path.join(folder, SPEC_NAME)
        Path(path).write_text(text)
        # What the user runs to finish this sweep if the job ends early: a new job.
        env = [
            f"--env={k}={v}"
            for k, v in job_env_vars().items()
            if k not in (SPEC_ENV, "PYTHONUNBUFFERED")
        ]
        rest = shlex.join([a for a in argv if a != "--resume"] + env)
        os.environ[RESUME_ENV] = f"kavg sweep submit SPEC.yaml --address DASHBOARD --resume {rest}"
        cli_main(["sweep", "run", path, "--address", "auto", *argv])


if __name__ == "__main__":
    main()
