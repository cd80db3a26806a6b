"""deployments/prefect.yaml: every entrypoint imports and every parameter set validates."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_deployment_entrypoint_loads_and_parameters_validate():
    from prefect.flows import load_flow_from_entrypoint

    from chips_core.stages.runconfig import load_run_config, with_executor

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert names == ["scheduled-refresh", "scheduled-refresh-dask", "adhoc-rescore", "adhoc-cpt", "adhoc-eval"]
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + func)
        params = flow.validate_parameters(dep["parameters"])
        load_run_config(ROOT / params["config"])
        if params.get("executor"):  # the Dask refresh: the config with that executor
            cfg = load_run_config(with_executor(ROOT / params["config"], params["executor"]))
            assert cfg.executor.kind == "dask" and cfg.executor.address == params["executor"]
        assert dep["work_pool"]["name"] == "chips-process"
    from prefect.client.schemas.schedules import CronSchedule

    for dep in spec["deployments"][:2]:
        CronSchedule(cron=dep["schedules"][0]["cron"], timezone="UTC")
