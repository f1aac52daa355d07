"""`balcaprl train` whose process kills itself (SIGKILL) in the middle of saving the checkpoint of step KILL_AT_STEP.

What a preempted job leaves: the weights, optimizer and scheduler of that step are written, its RNG states and
trainer_state.json are not. Usage: python tests/scripts/train_killed_inside_save.py KILL_AT_STEP <balcaprl train args>
"""

import os
import signal
import sys

from transformers import Trainer

from balcaprl.train import main

kill_at_step = int(sys.argv.pop(1))
save_rng_state = Trainer._save_rng_state


def _save_rng_state_or_die(self, output_dir):
    if self.state.global_step == kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)


Trainer._save_rng_state = _save_rng_state_or_die
main(["--config", *sys.argv[1:]])  # as `balcaprl train RECIPE ...` passes it
