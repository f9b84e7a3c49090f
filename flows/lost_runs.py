"""Reschedule flow runs whose worker died: a Prefect automation, created once per Prefect server.

A worker that is killed (a machine lost, a container evicted without notice) cannot report
anything: its flow run stays ``Running``. Deployment runs send heartbeats when the workers set
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` (30 s at least); this automation waits for the next one
and, when none comes within ``--within`` seconds, puts the run back to ``Scheduled``
(``AwaitingRetry``), so another worker of the same pool picks it up. DVC makes the retry cheap
and safe: the stages that finished were pushed, the others run again from their inputs.
A run that kills its worker every time (out of memory) is rescheduled every time: cancel it.

    PREFECT_API_URL=http://<server>:4200/api python flows/lost_runs.py --within 90
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

NAME = "reschedule-lost-flow-runs"
# A heartbeat, or a final state, must follow every heartbeat.
EXPECTED = {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
            "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"}


def reschedule_lost_runs(within_seconds: float) -> UUID:
    """Create the automation (or return the one already there)."""
    try:
        return Automation.read(name=NAME).id
    except ValueError:  # none yet
        pass
    automation = Automation(
        name=NAME,
        description="A running flow run whose heartbeats stopped goes back to Scheduled",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect=EXPECTED,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry",
                                    message="no heartbeat: its worker was lost; rescheduled")],
    ).create()
    return automation.id


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--within", type=float, default=90.0,
                        help="seconds without a heartbeat before a run is lost (> the heartbeat period)")
    print(reschedule_lost_runs(parser.parse_args().within))
