"""The IRGL record contract: trajectories, the six learning modes, their pyarrow schemas and validators.

This package imports nothing else of irgl (see the README's import rule: schemas <- stages <- pipeline,
trainer <- schemas). The contract itself is written down in docs/IRGL_FORMAT.md.
"""

from schemas.conversation import (
    ConversationError,
    conversation_from_json,
    conversation_to_json,
    validate_conversation,
)
from schemas.modes import (
    FULL_MODES,
    MODES,
    SYSTEM_PROMPT,
    Mode,
    ModeOptions,
    ModeRecord,
    RecordError,
    check_record,
    mode_records,
    understanding_query_improving,
    understanding_query_initial,
)
from schemas.reflection import Reflection, ReflectionError, parse_reflection, strip_think
from schemas.trajectory import Trajectory, TrajectoryError, trajectory_id

__all__ = [
    "FULL_MODES",
    "MODES",
    "SYSTEM_PROMPT",
    "ConversationError",
    "Mode",
    "ModeOptions",
    "ModeRecord",
    "RecordError",
    "Reflection",
    "ReflectionError",
    "Trajectory",
    "TrajectoryError",
    "check_record",
    "conversation_from_json",
    "conversation_to_json",
    "mode_records",
    "parse_reflection",
    "strip_think",
    "trajectory_id",
    "understanding_query_improving",
    "understanding_query_initial",
    "validate_conversation",
]
