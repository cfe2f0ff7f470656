"""The operator console: live twin against sensors, the event log, the agent's proposals,
decisions with roles and an audit trail; approved actions applied to the running governor and
their observed effect recorded (docs/console.md)."""

OUTCOME_AFTER_S = 60.0  # default: seconds from an applied action to its recorded outcome
