"""The run lifecycle: trigger, claim, settle, cancel, replay, reschedule, maintenance. No user code."""

from conveyor.engine.engine import Engine
from conveyor.engine.options import Limits, TriggerOptions, prepare_run

__all__ = ["Engine", "Limits", "TriggerOptions", "prepare_run"]
