"""Every CLI command given malformed arguments (unknown options, missing or mistyped values, undecodable bytes,
a config file of random bytes) answers with exactly one line, exit code 1 and no traceback (issue 28.6). Generated
from the commands' own parameters, so a command added later is covered too. In-process (``flows.cli.main``): no
value here is well-formed, so nothing reaches a model, a flow or a server."""
from __future__ import annotations

import os
import random
import signal

import pytest
import typer.main

from flows.cli import app, main

BAD_BYTES = "\udcff\udcfe\x01select \udc80"  # what Python makes of undecodable argv bytes (surrogateescape)


def _commands():
    return typer.main.get_command(app).commands


def _cases(tmp_path):
    from chips_core.platform.provenance import recorded_run
    from chips_core.platform.warehouse import Warehouse

    warehouse = tmp_path / "wh"
    with recorded_run(Warehouse(str(warehouse)), "ingest"):
        pass
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(random.Random(0).randbytes(512))
    not_yaml = tmp_path / "not.yaml"
    not_yaml.write_text("pool: [a, b\n  warehouse: {\n")
    for name, cmd in _commands().items():
        yield name, [name, "--no-such-option"]
        required = [p for p in cmd.params if p.required]
        if required:
            yield name, [name]  # every required value missing
        fill = []
        for p in required:  # every required value present but malformed
            value = str(garbage) if p.name == "config" else BAD_BYTES
            fill += [value] if not p.opts[0].startswith("-") else [p.opts[0], value]
        if required:
            yield name, [name, *fill]
            yield name, [name, *fill, "an-extra-argument"]
        if any(p.name == "config" for p in required):  # a config that is not YAML
            yield name, [name, str(not_yaml), *fill[1:]]
        for p in cmd.params:  # numbers that are not numbers
            kind = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            if p.opts[0].startswith("-") and kind in (int, float):
                yield name, [name, *fill, p.opts[0], "not-a-number"]
                yield name, [name, *fill, p.opts[0], BAD_BYTES]
    yield "(none)", ["no-such-command"]
    yield "(none)", [BAD_BYTES]
    yield "sql", ["sql", "-w", str(warehouse), "selec 1 from"]  # DuckDB's parser error spans lines
    yield "sql", ["sql", "-w", str(warehouse), BAD_BYTES]


@pytest.fixture
def as_a_fresh_process(monkeypatch):
    """`main` sets process-wide state (environment defaults for Prefect, a SIGINT handler): handed back after, so
    that the tests after this one run as they would without it."""
    env, handler = dict(os.environ), signal.getsignal(signal.SIGINT)
    yield
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, handler)


def test_every_command_with_malformed_arguments_says_one_line_and_exits_1(tmp_path, monkeypatch, capsys,
                                                                           as_a_fresh_process):
    monkeypatch.setenv("CHIPS_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("CHIPS_WAREHOUSE", raising=False)
    seen, failures = set(), []
    for name, argv in _cases(tmp_path):
        seen.add(name)
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        out, err = capsys.readouterr()
        lines = (out + err).strip().splitlines()
        if exit_.value.code != 1 or len(lines) != 1 or "Traceback" in out + err or not lines[0].startswith("chips: error: "):
            failures.append((argv, exit_.value.code, (out + err)[-500:]))
    assert not failures, failures
    assert seen >= set(_commands()) | {"(none)"}
