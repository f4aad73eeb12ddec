"""Errors a user can cause and fix. lm.main prints them as one line, never a traceback."""


class UserError(Exception):
  """Bad config, data, checkpoint or request: the message says what and where."""
