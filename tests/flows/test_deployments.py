"""deployments/prefect.yaml: every entrypoint imports and every parameter set validates."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_entrypoint_loads_and_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint

    from chips_core.stages.runconfig import load_run_config

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert names == ["scheduled-refresh", "adhoc-rescore", "adhoc-cpt", "adhoc-eval"]
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + func)
        params = flow.validate_parameters(dep["parameters"])
        load_run_config(ROOT / params["config"])
        assert dep["work_pool"]["name"] == "chips-process"
    cron = spec["deployments"][0]["schedules"][0]["cron"]
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=cron, timezone="UTC")
