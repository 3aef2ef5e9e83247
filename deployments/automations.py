"""The project's automations, kept in automations/*.yaml, applied to the Prefect server.

    make deploy        # prefect deploy --all, then: python -m lora_pipeline.deployments.automations

Each file is one automation in Prefect's own schema (what `prefect automation create
--from-file` reads), with a few `$names` filled in here. Applying is idempotent: an automation
is found by its name and updated in place, or created; a second `make deploy` never makes a
duplicate (Prefect's `create --from-file` would).

The values, each decided in one place:
- `$crash_after`: LORA_PIPELINE_CRASH_AFTER in prefect.yaml's job variables, which every
  deployment run also reads (its training fences itself after that long without the API);
- `$late_after`: LORA_PIPELINE_LATE_AFTER in this command's environment (default 1800 s);
- `$alert_block`: the webhook notification block `lora-pipeline-alerts`, made or updated from
  LORA_PIPELINE_ALERT_WEBHOOK (a URL, e.g. Slack's incoming webhook) when that is set, and kept
  on later runs without it. With no such block, the notification actions are left out.
"""

import argparse
import os
import string
import sys
from pathlib import Path

import yaml
from prefect import get_client
from prefect.events.schemas.automations import AutomationCore

ALERT_BLOCK = "lora-pipeline-alerts"
LATE_AFTER_S = 1800
# Slack's incoming webhooks read "text"; other receivers get the same JSON.
ALERT_JSON = {"text": "{{subject}}\n\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"}


def crash_after(prefect_yaml: Path) -> int:
    """LORA_PIPELINE_CRASH_AFTER of prefect.yaml's deployments (one value), checked against
    their heartbeat: a run is Crashed only after missing two heartbeats at least."""
    found = set()
    for deployment in yaml.safe_load(prefect_yaml.read_text())["deployments"]:
        env = deployment.get("work_pool", {}).get("job_variables", {}).get("env", {})
        found.add((int(env["LORA_PIPELINE_CRASH_AFTER"]), int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])))
    if len(found) != 1:
        raise SystemExit(f"{prefect_yaml}: the deployments disagree on LORA_PIPELINE_CRASH_AFTER or the heartbeat "
                         f"({sorted(found)}): set them once, in definitions.work_pool.job_variables.env")
    (after, heartbeat), = found
    if after < 2 * heartbeat:
        raise SystemExit(f"{prefect_yaml}: LORA_PIPELINE_CRASH_AFTER {after} s is under two heartbeats of "
                         f"{heartbeat} s: a busy but healthy run would be marked Crashed")
    return after


def alert_block(webhook: str | None) -> str | None:
    """The id of the alert webhook block: saved from `webhook` when given, else the one saved
    before, else None."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if webhook:
        block = CustomWebhookNotificationBlock(name=ALERT_BLOCK, url=webhook, json_data=ALERT_JSON)
        return str(block.save(ALERT_BLOCK, overwrite=True))
    try:
        return str(CustomWebhookNotificationBlock.load(ALERT_BLOCK)._block_document_id)
    except ValueError:  # none saved
        return None


def specs(folder: Path, values: dict) -> list[dict]:
    """The automations of `folder`, `$names` filled in; actions that need the alert block are
    left out while there is none."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(string.Template(path.read_text()).substitute(
            {k: v if v is not None else "" for k, v in values.items()}))
        spec["actions"] = [a for a in spec["actions"] if a.get("block_document_id", True)]
        if spec["actions"]:
            found.append(spec)
    return found


def apply(automations: list[dict]) -> list[str]:
    """Creates or updates each automation by name (duplicates of a name are removed); returns
    what it did, a line each."""
    done = []
    with get_client(sync_client=True) as client:
        existing: dict[str, list] = {}
        for a in client.read_automations():
            existing.setdefault(a.name, []).append(a)
        for spec in automations:
            core = AutomationCore.model_validate(spec)
            first, *extra = existing.get(core.name, [None])
            if first is None:
                client.create_automation(core)
                done.append(f"created  {core.name}")
            else:
                client.update_automation(first.id, core)
                done.append(f"updated  {core.name}")
            for duplicate in extra:
                client.delete_automation(duplicate.id)
                done.append(f"removed a duplicate of {core.name}")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_pipeline.deployments.automations",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=Path("automations"), help="the automations (default automations/)")
    ap.add_argument("--prefect-yaml", type=Path, default=Path("prefect.yaml"))
    a = ap.parse_args(argv)
    block = alert_block(os.environ.get("LORA_PIPELINE_ALERT_WEBHOOK"))
    values = {"crash_after": crash_after(a.prefect_yaml),
              "late_after": int(os.environ.get("LORA_PIPELINE_LATE_AFTER", LATE_AFTER_S)), "alert_block": block}
    for line in apply(specs(a.folder, values)):
        print(line)
    if block is None:
        print(f"No alerts: no webhook block {ALERT_BLOCK} yet. Give its URL once: "
              "LORA_PIPELINE_ALERT_WEBHOOK=https://... make deploy", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
