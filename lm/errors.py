"""Errors a user can cause and fix. lm.main prints them as one line, never a traceback."""


class UserError(Exception):
  """Bad config, data, checkpoint or request: the message says what and where."""


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of `step` was saved. Rerun the command to resume."""

  def __init__(self, step, signal_name):
    self.step = step
    super().__init__(f"{signal_name} received: saved a checkpoint at step {step}; run the "
                     "same command again to resume")


class NonFiniteLoss(Exception):
  """The loss or gradients became NaN/Inf and config.train.nonfinite is 'stop'."""


class ConfigError(UserError):
  """A user-fixable problem with a config; the message names the field."""

  def __init__(self, field, message):
    self.field = field
    super().__init__(f"config.{field}: {message}")
