"""How a stage says something other than "done": raised by stages, understood by the runner."""


class InputError(ValueError):
    """The stage's inputs or config are unusable (wrong data columns, missing file, mismatched models).

    The message says what was expected and what was found; the runner prints it without a traceback.
    """


class Waiting(Exception):
    """Not enough external input yet (e.g. "37/200 records ranked"): nothing is published, the stages
    downstream do not run, and `rlhf run` ends with a distinct exit status. Running again continues."""
