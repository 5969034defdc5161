"""Pipeline parallelism: stages on the ranks of a "pp" group, and schedules as per-rank programs of F / B / W.

    stage.py       PipelineStage: a submodule as one stage, what it keeps per micro-batch
    schedule.py    the runtime every schedule shares (split, run the program, send / recv)
    actions.py     Action (F / B / W, micro-batch, chunk), programs as text
    dry_run.py     a program without tensors: checked, timed, its deadlock named
    backward.py    the backward split into B (input gradient) and W (weight gradient)
    gpipe.py, one_f_one_b.py, interleaved.py, zbh1.py   one schedule each
    registry.py    the schedules by name; bubble_fraction, in_flight, sent_bytes (closed forms)
    split.py       layers into stages
"""

from .actions import Action, format_program, parse_program
from .dry_run import Slot, bubble, check_program, dry_run
from .gpipe import ScheduleGPipe
from .interleaved import ScheduleInterleaved1F1B
from .one_f_one_b import Schedule1F1B
from .registry import SCHEDULES, bubble_fraction, in_flight, schedule_class, sent_bytes
from .schedule import PipelineSchedule
from .split import layer_ranges, stage_module
from .stage import PipelineStage
from .zbh1 import ScheduleZBH1
