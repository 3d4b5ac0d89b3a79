"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Bad input: say what item, what is wrong, what to do."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""
