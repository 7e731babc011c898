"""Gate of the tests marked `worker_env` (parity against an official stack in its own env, harness/envs.py): they
run where the env is built and they were asked for, with `-m worker_env` or $HARNESS_WORKER_ENV_TESTS=1 (.ci/run's
worker-env step), so `make test` stays fast on a machine that happens to have the envs."""
from __future__ import annotations

import os

import pytest

OPT_IN = "HARNESS_WORKER_ENV_TESTS"


def asked_for(config) -> bool:
    expr = (config.getoption("markexpr", "") or "").replace(" ", "")
    return os.environ.get(OPT_IN, "") not in ("", "0") or ("worker_env" in expr and "notworker_env" not in expr)


def require(request, name: str) -> None:
    """Skip, saying why, unless env `name` is built and worker-env tests were asked for."""
    from harness import envs
    state = envs.state(name)
    if state != "built":
        pytest.skip(f"the {name} env is {state}: run `harness env build {name}`")
    if not asked_for(request.config):
        pytest.skip(f"parity test in the {name} env: run with -m worker_env or {OPT_IN}=1 (CI's worker-env step does)")
