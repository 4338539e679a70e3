"""No telemetry leaves the machine, and nothing waits on a network it cannot reach.

`switch_off()` must run before prefect, mlflow, dvc or transformers are imported: some read these
variables once, at import. Values already set by the user win.
"""

import os

OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def switch_off() -> None:
    for key, value in OFF.items():
        os.environ.setdefault(key, value)
